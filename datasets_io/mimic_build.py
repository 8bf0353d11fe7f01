"""Build the curriculum from the raw PhysioNet releases: MIMIC-CXR-JPG + MIMIC-CXR reports + MIMIC-IV (+ MIMIC-IV-ED).

    launcher data build --cxr-jpg physionet.org/files/mimic-cxr-jpg/2.0.0 \\
        --reports physionet.org/files/mimic-cxr/2.0.0 --mimic-iv physionet.org/files/mimiciv/2.2 \\
        --mimic-iv-ed physionet.org/files/mimic-iv-ed/2.2 --out data/mimic --subjects p10 --max-studies 2000
    launcher local --config configs/tiny.yaml --set data.root=data/mimic

    # the same on the raw-format fixture this project generates (no credentials needed):
    python -m datasets_io.mimic_fixture --out /tmp/mimic_raw
    launcher data build --cxr-jpg /tmp/mimic_raw/mimic-cxr-jpg --reports /tmp/mimic_raw/mimic-cxr \\
        --mimic-iv /tmp/mimic_raw/mimiciv --mimic-iv-ed /tmp/mimic_raw/mimic-iv-ed --out /tmp/mimic_curriculum

Writes OUT/curriculum_{train,val,test}.jsonl (official split "validate" -> val), OUT/files/pXX/p<subject>/s<study>/
<dicom_id>.jpg (a symlink to, or a copy of, the chosen image, so `--data-root OUT` works) and OUT/build_report.json.
Every record uses exactly the templates of datasets_io.records. The steps, each counted in the report:

1. metadata + split: one image per study, by view preference (PA over AP unless --views says otherwise; ties by
   dicom_id), the study's split from the official split file. A patient in two splits fails the build.
2. CheXpert labels, all 14: 1.0 Positive, 0.0 Negative, -1.0 Uncertain, blank = not mentioned. Not mentioned is
   never merged into Uncertain: by default it is omitted from the block (--unmentioned omit), or rendered Negative
   (--unmentioned negative, the common reading of a blank); records.CHEXPERT_VALUES is unchanged either way.
3. The impression, by the MIMIC-CXR sectioning convention (MIT-LCP/mimic-cxr txt/section_parser.py): the last
   IMPRESSION section, else the last FINDINGS section, else the report's last paragraph. No usable text: dropped.
4. MIMIC-IV: the admission whose window admittime..dischtime contains the study's date and time (never "the most
   recent admission"); ICD flags of that admission from configs/icd_map.yaml; a study inside no admission has no
   known diagnoses, so by default it gets no Stage B row (--no-admission stage-a-only; `icd-none` writes
   {"findings": "None"} instead). Age at the study = anchor_age + study year - anchor_year; sex; admission type;
   chronic conditions from admissions discharged before the study; the lab panel (LAB_PANEL) and ED vitals nearest
   BEFORE the study within a window, with unit, reference range and hours before (by charttime, the time the
   specimen or vital was taken). Nothing measured after the study is used.

labevents.csv.gz is tens of GB: it is streamed in blocks, filtered to the panel's items and the chosen subjects,
and reduced on the fly to the best row per (study, lab) (NearestBefore), so memory depends on the number of
studies, never on the file's size (benchmarks/labevents_memory.py). Output is deterministic for the same inputs.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from datasets_io.records import CHEXPERT_LABELS, STAGE_MODES, prompt_a, prompt_b, target_a, target_b
from datasets_io.errors import LauncherError


class _LazyModule:
    """A module imported on first attribute access. The CLI imports this file for its two hooks on every
    `launcher ...` call; numpy + pyarrow + tqdm would make `launcher --help` ~0.7 s slower."""

    def __init__(self, name: str):
        self._name, self._module = name, None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


np = _LazyModule("numpy")
pa = _LazyModule("pyarrow")
pc = _LazyModule("pyarrow.compute")
pacsv = _LazyModule("pyarrow.csv")
yaml = _LazyModule("yaml")
_tqdm = _LazyModule("tqdm")


def tqdm(*args: Any, **kwargs: Any) -> Any:
    return _tqdm.tqdm(*args, **kwargs)


DEFAULT_ICD_MAP = Path(__file__).resolve().parents[1] / "configs" / "icd_map.yaml"
EPOCH = datetime(1970, 1, 1)
SPLIT_FILES = {"train": "curriculum_train.jsonl", "validate": "curriculum_val.jsonl", "test": "curriculum_test.jsonl"}
CHEXPERT_RENDER = {1.0: "Positive", 0.0: "Negative", -1.0: "Uncertain"}

# The raw files and the columns read from each, with their Arrow types (all other columns are skipped while parsing).
I64, F64, STR, TS = "int64", "double", "string", "timestamp[s]"
METADATA = ("mimic-cxr-2.0.0-metadata.csv.gz", {"dicom_id": STR, "subject_id": I64, "study_id": I64,
                                                "ViewPosition": STR, "StudyDate": I64, "StudyTime": F64})
CHEXPERT = ("mimic-cxr-2.0.0-chexpert.csv.gz", {"subject_id": I64, "study_id": I64,
                                                **{label: F64 for label in CHEXPERT_LABELS}})
SPLIT = ("mimic-cxr-2.0.0-split.csv.gz", {"dicom_id": STR, "study_id": I64, "subject_id": I64, "split": STR})
PATIENTS = ("patients.csv.gz", {"subject_id": I64, "gender": STR, "anchor_age": I64, "anchor_year": I64})
ADMISSIONS = ("admissions.csv.gz", {"subject_id": I64, "hadm_id": I64, "admittime": TS, "dischtime": TS,
                                    "admission_type": STR})
DIAGNOSES = ("diagnoses_icd.csv.gz", {"subject_id": I64, "hadm_id": I64, "icd_code": STR, "icd_version": I64})
D_LABITEMS = ("d_labitems.csv.gz", {"itemid": I64, "label": STR, "fluid": STR})
LABEVENTS = ("labevents.csv.gz", {"labevent_id": I64, "subject_id": I64, "itemid": I64, "charttime": TS,
                                  "valuenum": F64, "valueuom": STR, "ref_range_lower": F64, "ref_range_upper": F64})
VITALSIGN = ("vitalsign.csv.gz", {"subject_id": I64, "stay_id": I64, "charttime": TS, "temperature": F64,
                                  "heartrate": F64, "resprate": F64, "o2sat": F64, "sbp": F64, "dbp": F64})

# Lab panel of the Patient Data block: output name -> (d_labitems labels, fluid). Resolved to itemids through
# d_labitems (exact label and fluid, case-insensitive), so no itemid is hard-coded; several itemids may share a
# name (e.g. Hemoglobin from Hematology and from Blood Gas): the nearest measurement of any of them wins.
LAB_PANEL: dict[str, tuple[tuple[str, ...], str]] = {
    "NT-proBNP": (("NTproBNP",), "Blood"),
    "Troponin T": (("Troponin T",), "Blood"),
    "Creatinine": (("Creatinine",), "Blood"),
    "BUN": (("Urea Nitrogen",), "Blood"),
    "Sodium": (("Sodium",), "Blood"),
    "Potassium": (("Potassium",), "Blood"),
    "Glucose": (("Glucose",), "Blood"),
    "WBC": (("White Blood Cells", "WBC Count"), "Blood"),
    "Hemoglobin": (("Hemoglobin",), "Blood"),
    "Platelets": (("Platelet Count",), "Blood"),
    "Lactate": (("Lactate",), "Blood"),
    "CRP": (("C-Reactive Protein",), "Blood"),
    "pH": (("pH",), "Blood"),
    "pO2": (("pO2",), "Blood"),
    "pCO2": (("pCO2",), "Blood"),
}
# MIMIC-IV-ED vitalsign column -> (output name, unit). The file has no unit column; these are its conventions.
VITALS: dict[str, tuple[str, str]] = {
    "temperature": ("temperature", "degF"),
    "heartrate": ("heart_rate", "bpm"),
    "resprate": ("resp_rate", "breaths/min"),
    "o2sat": ("o2_sat", "%"),
    "sbp": ("sbp", "mmHg"),
    "dbp": ("dbp", "mmHg"),
}


# --------------------------------------------------------------------------------------------- options
@dataclass
class BuildOptions:
    """What `launcher data build` was asked to do; saved in build_report.json."""

    cxr_jpg: str
    """MIMIC-CXR-JPG folder: the three mimic-cxr-2.0.0-*.csv.gz files and files/pXX/... images."""
    reports: str
    """MIMIC-CXR folder with files/pXX/p<subject>/s<study>.txt (or that files/ folder itself)."""
    mimic_iv: str
    """MIMIC-IV folder holding hosp/ (or the hosp folder itself)."""
    out: str
    """Output data root."""
    mimic_iv_ed: str | None = None
    """MIMIC-IV-ED folder holding ed/vitalsign.csv.gz (or the ed folder itself); None = no vitals."""
    subjects: tuple[str, ...] = ()
    """Subject folders to keep: pXX (a group, e.g. p10) or p<subject_id>; empty = all."""
    views: tuple[str, ...] = ("PA", "AP")
    """ViewPosition values usable as the study's image, most preferred first."""
    max_studies: int = 0
    """Stop after this many kept studies, in (subject_id, study_id) order; 0 = all."""
    icd_map: str = str(DEFAULT_ICD_MAP)
    """The versioned ICD flag / chronic-condition map (configs/icd_map.yaml)."""
    unmentioned: Literal["omit", "negative"] = "omit"
    """CheXpert blank (not mentioned): `omit` from the block, or render `negative`. Never Uncertain."""
    no_admission: Literal["stage-a-only", "icd-none"] = "stage-a-only"
    """A study inside no admission: `stage-a-only` (no Stage B row) or `icd-none` (Stage B with findings None)."""
    admission_start: Literal["admittime", "edregtime"] = "admittime"
    """Start of the admission window: `admittime`, or `edregtime` (the ED registration before it, when present)."""
    lab_window_hours: float = 24.0
    """A lab counts when taken at most this long before the study (and never after it)."""
    vital_window_hours: float = 24.0
    """The same for ED vital signs."""
    image_mode: Literal["symlink", "copy"] = "symlink"
    """How the chosen image lands under OUT/files: `symlink` (absolute) or `copy`."""


# --------------------------------------------------------------------------------------------- reading CSVs
def locate(root: str | Path, name: str, flag: str, subdirs: tuple[str, ...] = ("",)) -> Path:
    """The release file `name` (.csv.gz, or the same uncompressed) under root/<subdir>, or a LauncherError."""
    root = Path(root)
    tried = []
    for sub in subdirs:
        for candidate in (name, name.removesuffix(".gz")):
            path = root / sub / candidate if sub else root / candidate
            tried.append(str(path))
            if path.is_file():
                return path
    raise LauncherError(f"{flag} {root}: {name} not found (looked for {', '.join(tried)}); point {flag} at the "
                        "folder of the PhysioNet release that holds it")


def _open(path: Path) -> tuple[pa.NativeFile, pa.NativeFile]:
    """(raw file, decoded stream); the raw file's tell() is the progress through a compressed file."""
    raw = pa.OSFile(str(path), "r")
    return raw, (pa.CompressedInputStream(raw, "gzip") if path.suffix == ".gz" else raw)


def csv_header(path: Path) -> list[str]:
    raw, stream = _open(path)
    try:
        head = stream.read(1 << 16)
    except (pa.ArrowInvalid, OSError) as e:
        raise LauncherError(f"{path}: cannot read ({e})") from None
    finally:
        stream.close()
    text = head.decode("utf-8-sig", errors="replace")
    first = text.split("\n", 1)[0].rstrip("\r")
    if not first:
        raise LauncherError(f"{path}: empty file, expected a CSV header")
    return next(csv.reader([first]))


_COLUMN_NO = re.compile(r"CSV column #(\d+)")


def _name_column(message: str, header: list[str]) -> str:
    """pyarrow says 'In CSV column #3: ...'; add the column's name."""
    def named(m: re.Match) -> str:
        i = int(m.group(1))
        return f"{m.group(0)} ('{header[i]}')" if i < len(header) else m.group(0)

    return _COLUMN_NO.sub(named, message)


def stream_csv(
    path: Path,
    columns: dict[str, str],
    *,
    keep: Callable[[pa.RecordBatch], pa.Array] | None = None,
    desc: str | None = None,
    block_size: int = 1 << 20,
) -> Iterator[pa.RecordBatch]:
    """Batches of `columns` ({name: Arrow type alias}; blank = null), filtered by `keep(batch) -> boolean mask`.

    Memory: pyarrow's read-ahead, a bounded queue of blocks of `block_size` bytes of CSV text (measured: at most
    ~40 MiB of Arrow buffers with 1 MiB blocks, ~150 MiB with 4 MiB blocks, at the same speed), whatever the
    file's size.
    Missing columns and unparseable values raise a LauncherError naming the file and the column.
    """
    header = csv_header(path)
    missing = [c for c in columns if c not in header]
    if missing:
        raise LauncherError(f"{path}: missing column(s) {missing}; the file's columns are {header}")
    types = {name: pa.type_for_alias(alias) for name, alias in columns.items()}
    raw, stream = _open(path)
    bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=desc, disable=None if desc else True,
               leave=False, file=sys.stderr)
    try:
        try:
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=block_size),
                convert_options=pacsv.ConvertOptions(include_columns=list(columns), column_types=types,
                                                     strings_can_be_null=True),
            )
        except (pa.ArrowInvalid, pa.ArrowKeyError, OSError) as e:
            raise LauncherError(f"{path}: {_name_column(str(e), header)}") from None
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except (pa.ArrowInvalid, pa.ArrowKeyError, OSError) as e:
                raise LauncherError(f"{path}: {_name_column(str(e), header)}") from None
            bar.update(raw.tell() - bar.n)
            if keep is not None:
                batch = batch.filter(keep(batch))
            if batch.num_rows:
                yield batch
    finally:
        bar.close()
        stream.close()


def read_csv(path: Path, columns: dict[str, str], **kw: Any) -> pa.Table:
    schema = pa.schema([(name, pa.type_for_alias(alias)) for name, alias in columns.items()])
    return pa.Table.from_batches(list(stream_csv(path, columns, **kw)), schema=schema)


def subject_filter(subjects: np.ndarray) -> Callable[[pa.RecordBatch], pa.Array]:
    value_set = pa.array(subjects, type=pa.int64())
    return lambda batch: pc.is_in(batch.column("subject_id"), value_set=value_set)


def subject_folder(subject_id: int) -> str:
    return f"p{str(subject_id)[:2]}"


def study_relpath(subject_id: int, study_id: int) -> str:
    return f"files/{subject_folder(subject_id)}/p{subject_id}/s{study_id}"


def parse_subject_selectors(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if not re.fullmatch(r"p\d{2}|p\d{8}", s)]
    if bad:
        raise LauncherError(f"--subjects: {bad} are not subject folders; use pXX (e.g. p10) or p<8-digit subject_id>")
    return items


def subject_selected(subject_id: int, selectors: tuple[str, ...]) -> bool:
    if not selectors:
        return True
    sid = str(subject_id)
    return any((len(s) == 3 and sid[:2] == s[1:]) or sid == s[1:] for s in selectors)


# --------------------------------------------------------------------------------------------- ICD map
@dataclass(frozen=True)
class IcdMap:
    """Prefix lists per flag and ICD version (codes without dots), plus the chronic-condition lists."""

    version: str
    sha256: str
    flags: dict[str, dict[int, tuple[str, ...]]]
    chronic: dict[str, dict[int, tuple[str, ...]]]

    @staticmethod
    def match(table: dict[str, dict[int, tuple[str, ...]]], code: str, version: int) -> list[str]:
        """Names in `table` with a prefix of `code` among the prefixes of its ICD version."""
        return [name for name, by_version in table.items()
                if by_version.get(version) and code.startswith(by_version[version])]


def load_icd_map(path: str | Path) -> IcdMap:
    """Load and validate the ICD map: every problem is reported at once, naming its key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise LauncherError(f"--icd-map {path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise LauncherError(f"--icd-map {path}: not valid YAML ({e})") from None
    problems: list[str] = []
    if not isinstance(data, dict):
        raise LauncherError(f"{path}: expected a mapping with version, flags, chronic_conditions")
    for key in sorted(set(data) - {"version", "flags", "chronic_conditions"}):
        problems.append(f"unknown key '{key}'")
    if not isinstance(data.get("version"), (str, int, float)):
        problems.append("'version' is required (a string such as \"1.0\")")

    def section(name: str) -> dict[str, dict[int, tuple[str, ...]]]:
        raw = data.get(name)
        out: dict[str, dict[int, tuple[str, ...]]] = {}
        if not isinstance(raw, dict):
            problems.append(f"'{name}' must be a mapping of name -> {{description, icd9, icd10}}")
            return out
        for flag, spec in raw.items():
            where = f"{name}.{flag}"
            if not isinstance(spec, dict):
                problems.append(f"{where}: expected a mapping")
                continue
            for key in sorted(set(spec) - {"description", "icd9", "icd10"}):
                problems.append(f"{where}: unknown key '{key}'")
            by_version: dict[int, tuple[str, ...]] = {}
            for version in (9, 10):
                prefixes = spec.get(f"icd{version}", [])
                if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
                    problems.append(f"{where}.icd{version}: expected a list of quoted strings")
                    continue
                for p in prefixes:
                    if not re.fullmatch(r"[0-9A-Z]+", p):
                        problems.append(f"{where}.icd{version}: '{p}' must be upper case letters/digits, no dots")
                by_version[version] = tuple(prefixes)
            if not any(by_version.values()):
                problems.append(f"{where}: no icd9 or icd10 prefixes")
            out[str(flag)] = by_version
        return out

    flags = section("flags")  # the map defines the label space (configs/icd_map.yaml, configs/icd_map_seed.yaml)
    chronic = section("chronic_conditions")
    if isinstance(data.get("flags"), dict) and not data["flags"]:
        problems.append("'flags' is empty: name at least one flag")
    if problems:
        raise LauncherError(f"{path}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return IcdMap(str(data["version"]), hashlib.sha256(text.encode()).hexdigest(), flags, chronic)


# --------------------------------------------------------------------------------------------- reports
_SECTION_RE = re.compile(r"\n *([A-Z ()/,-]+):\s")
_FINDINGS_LIKE = re.compile(r"chest|portable|pa and lat|lateral and pa|ap and lat|lateral and ap|frontal|two views|"
                            r"one view|pa view|ap view|lateral view")


def normalize_section_name(name: str) -> str:
    """The convention's normalization, condensed: impression/conclusion, findings and view titles are findings."""
    s = name.lower().strip()
    if "impression" in s or s == "conclusion":
        return "impression"
    if "finding" in s or _FINDINGS_LIKE.search(s):
        return "findings"
    return s


def split_sections(text: str) -> list[tuple[str, str]]:
    """[(normalized name, text)] of a MIMIC-CXR report, following MIT-LCP/mimic-cxr txt/section_parser.py:
    a section starts at an upper-case 'NAME:' at a line start; text before the first is the preamble; empty
    impression/findings sections are dropped; a report with neither gets its last paragraph as `last_paragraph`."""
    text = text.replace("\r\n", "\n")
    found = list(_SECTION_RE.finditer(text))
    if not found:
        sections = [("full report", text)]
    else:
        sections = [("preamble", text[: found[0].start(1)])]
        for i, m in enumerate(found):
            end = found[i + 1].start() if i + 1 < len(found) else len(text)
            sections.append((normalize_section_name(m.group(1)), text[m.end() : end]))
    sections = [(n, t) for n, t in sections if not (n in ("impression", "findings") and not t.strip())]
    names = {n for n, _ in sections}
    if "impression" not in names and "findings" not in names:
        paragraphs = [p for p in re.split(r"\n\s*\n", sections[-1][1]) if p.strip()]
        if len(paragraphs) > 1:
            name, _ = sections[-1]
            sections[-1] = (name, "\n\n".join(paragraphs[:-1]))
            sections.append(("last_paragraph", paragraphs[-1]))
    return sections


def clean_text(text: str) -> str:
    """One line, single spaces: a newline inside the impression could start a fake 'ICD:' block in the target."""
    return " ".join(text.split())


def extract_impression(text: str) -> tuple[str | None, str]:
    """(impression, source) where source is impression | findings | last_paragraph | none. The text is usable when
    it has at least one letter once the de-identification placeholders (___) are removed."""
    sections = split_sections(text)
    for source in ("impression", "findings", "last_paragraph"):
        picked = [t for n, t in sections if n == source]
        if picked:
            cleaned = clean_text(picked[-1])
            if re.search(r"[A-Za-z]", cleaned.replace("_", "")):
                return cleaned, source
            return None, "none"
    return None, "none"


# --------------------------------------------------------------------------------------------- time
def study_epoch_seconds(date: int | None, time: float | None, where: str) -> int:
    """StudyDate (YYYYMMDD int) + StudyTime (HHMMSS.fff float, leading zeros lost) -> seconds since 1970."""
    if date is None or time is None or (isinstance(time, float) and math.isnan(time)):
        raise LauncherError(f"{where}: StudyDate/StudyTime missing")
    hh, rest = divmod(int(time), 10000)
    mm, ss = divmod(rest, 100)
    try:
        dt = datetime(date // 10000, date // 100 % 100, date % 100, hh, mm, ss)
    except ValueError as e:
        raise LauncherError(f"{where}: bad StudyDate {date} / StudyTime {time} ({e})") from None
    return int((dt - EPOCH).total_seconds())


def epoch_year(seconds: int) -> int:
    return (EPOCH + timedelta(seconds=int(seconds))).year


def to_epoch_seconds(t: datetime) -> int:
    return int((t - EPOCH).total_seconds())


def ts_seconds(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """timestamp[s] column -> int64 seconds since 1970 (nulls must be filtered first)."""
    return np.asarray(column.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


# --------------------------------------------------------------------------------------------- nearest-before
class NearestBefore:
    """For every (study, item): the measurement with the latest time at or before the study, within a window.

    Streaming: `update` takes one batch of measurements and keeps, per (study, item), only the best so far (ties
    by the row's `tie` key, e.g. labevent_id, so the answer does not depend on row order). Memory is
    O(studies x items), independent of how many rows stream through; each update pairs a measurement only with
    the studies of its patient that fall inside the window after it (a binary search on (patient, study time)),
    so a patient with 100 studies does not multiply the batch by 100.
    """

    TIME_SPAN = 1 << 36  # seconds since 1970 must lie in [0, 2^36) (years 1970-4147): room for (patient, time) keys

    def __init__(self, study_subject: np.ndarray, study_time: np.ndarray, n_items: int, window_s: float):
        study_subject, study_time = np.asarray(study_subject, np.int64), np.asarray(study_time, np.int64)
        if len(study_time) and (study_time.min() < 0 or study_time.max() >= self.TIME_SPAN):
            raise ValueError("study times must lie between 1970 and 4147")
        self.study_time = study_time
        self.n_items, self.window_s = n_items, int(window_s)
        self.subjects = np.unique(study_subject)
        self._order = np.lexsort((study_time, study_subject))  # sorted position -> study index
        rank = np.searchsorted(self.subjects, study_subject[self._order])
        self._keys = rank * self.TIME_SPAN + study_time[self._order]  # ascending (patient rank, study time)
        shape = (len(study_time) * n_items,)  # flat index study * n_items + item
        self.delta = np.full(shape, np.iinfo(np.int64).max, np.int64)
        self.tie = np.full(shape, np.iinfo(np.int64).max, np.int64)
        self.value = np.full(shape, np.nan)
        self.lo = np.full(shape, np.nan)
        self.hi = np.full(shape, np.nan)
        self.unit = np.full(shape, -1, np.int32)
        self.units: list[str] = []
        self._unit_code: dict[str, int] = {}
        self.pairs_in_window = 0  # (measurement, study) pairs inside a window, before the reduction

    def unit_code(self, unit: str) -> int:
        """The int code of a unit string in self.units (added on first sight)."""
        if unit not in self._unit_code:
            self._unit_code[unit] = len(self.units)
            self.units.append(unit)
        return self._unit_code[unit]

    def unit_codes(self, column: pa.Array) -> np.ndarray:
        """Strings -> int codes into self.units (-1 = null), through pyarrow's dictionary encoding."""
        encoded = pc.dictionary_encode(column)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        mapping = np.array([self.unit_code(u) for u in encoded.dictionary.to_pylist()] + [-1], np.int32)
        indices = encoded.indices.fill_null(len(mapping) - 1).to_numpy(zero_copy_only=False)
        return mapping[indices]

    def update(self, subject, item, time_s, value, unit, lo, hi, tie) -> None:
        """Fold one batch of measurements (equal-length arrays) into the best-so-far."""
        if not len(self.subjects):
            return
        pos = np.minimum(np.searchsorted(self.subjects, subject), len(self.subjects) - 1)
        usable = (self.subjects[pos] == subject) & (time_s >= 0) & (time_s < self.TIME_SPAN - self.window_s)
        usable &= np.isfinite(value)  # a non-finite value would not survive JSON
        rows = np.flatnonzero(usable)
        if not len(rows):
            return
        # the studies of the row's patient with time in [t, t + window]: a contiguous run of the sorted keys
        key = pos[rows] * self.TIME_SPAN + time_s[rows]
        first = np.searchsorted(self._keys, key, side="left")
        counts = np.searchsorted(self._keys, key + self.window_s, side="right") - first
        row_idx = np.repeat(rows, counts)  # (pairs,)
        offset = np.arange(len(row_idx)) - np.repeat(np.cumsum(counts) - counts, counts)
        study = self._order[np.repeat(first, counts) + offset]
        delta = self.study_time[study] - time_s[row_idx]  # 0 <= delta <= window by construction
        if not len(row_idx):
            return
        self.pairs_in_window += len(row_idx)
        key = study * self.n_items + item[row_idx]
        row_tie = tie[row_idx]
        order = np.lexsort((row_tie, delta, key))  # best first within each key
        key, delta, row_idx, row_tie = key[order], delta[order], row_idx[order], row_tie[order]
        head = np.ones(len(key), bool)
        head[1:] = key[1:] != key[:-1]
        key, delta, row_idx, row_tie = key[head], delta[head], row_idx[head], row_tie[head]
        better = (delta < self.delta[key]) | ((delta == self.delta[key]) & (row_tie < self.tie[key]))
        key, row_idx = key[better], row_idx[better]
        self.delta[key], self.tie[key] = delta[better], row_tie[better]
        self.value[key], self.unit[key] = value[row_idx], unit[row_idx]
        self.lo[key], self.hi[key] = lo[row_idx], hi[row_idx]

    def results(self, names: list[str], with_range: bool) -> list[dict[str, dict[str, Any]]]:
        """Per study: {name: {"value", "unit", ["reference_range",] "hours_before"}} in `names` order."""
        out: list[dict[str, dict[str, Any]]] = []
        found = self.delta != np.iinfo(np.int64).max
        for s in range(len(self.study_time)):
            block: dict[str, dict[str, Any]] = {}
            for i, name in enumerate(names):
                k = s * self.n_items + i
                if not found[k]:
                    continue
                entry: dict[str, Any] = {"value": float(self.value[k]),
                                         "unit": self.units[self.unit[k]] if self.unit[k] >= 0 else None}
                if with_range:
                    lo, hi = self.lo[k], self.hi[k]
                    bounds = [None if np.isnan(b) else float(b) for b in (lo, hi)]
                    entry["reference_range"] = None if bounds == [None, None] else bounds
                entry["hours_before"] = round(float(self.delta[k]) / 3600.0, 1)
                block[name] = entry
            out.append(block)
        return out


def resolve_lab_panel(d_labitems: Path) -> tuple[dict[int, int], list[str], list[str]]:
    """(itemid -> panel index, panel names, names with no itemid) from d_labitems by label and fluid."""
    table = read_csv(d_labitems, D_LABITEMS[1])
    names = list(LAB_PANEL)
    wanted = {(label.lower(), fluid.lower()): i for i, (labels, fluid) in enumerate(LAB_PANEL.values())
              for label in labels}
    items: dict[int, int] = {}
    for itemid, label, fluid in zip(*(table.column(c).to_pylist() for c in ("itemid", "label", "fluid"))):
        i = wanted.get(((label or "").strip().lower(), (fluid or "").strip().lower()))
        if i is not None:
            items[itemid] = i
    missing = [n for i, n in enumerate(names) if i not in set(items.values())]
    return items, names, missing


def nearest_labs(labevents: Path, items: dict[int, int], n_items: int, study_subject: np.ndarray,
                 study_time: np.ndarray, window_hours: float, *, desc: str | None = "labevents",
                 block_size: int = 1 << 20) -> tuple[NearestBefore, dict[str, int]]:
    """Stream labevents, keeping rows of the chosen subjects and panel items with a numeric value."""
    reducer = NearestBefore(study_subject, study_time, n_items, window_hours * 3600)
    subjects = pa.array(np.unique(study_subject), pa.int64())
    itemids = np.array(sorted(items), np.int64)
    itemid_set = pa.array(itemids)
    item_index = np.array([items[i] for i in itemids], np.int64)
    stats = Counter()

    def keep(batch: pa.RecordBatch) -> pa.Array:
        stats["blocks_read"] += 1
        stats["rows_scanned"] += batch.num_rows
        mask = pc.and_(pc.is_in(batch.column("subject_id"), value_set=subjects),
                       pc.is_in(batch.column("itemid"), value_set=itemid_set))
        return pc.and_(mask, pc.and_(pc.is_valid(batch.column("valuenum")), pc.is_valid(batch.column("charttime"))))

    for batch in stream_csv(labevents, LABEVENTS[1], keep=keep, desc=desc, block_size=block_size):
        stats["rows_kept"] += batch.num_rows
        ids = batch.column("itemid").to_numpy()
        reducer.update(
            subject=batch.column("subject_id").to_numpy(),
            item=item_index[np.searchsorted(itemids, ids)],
            time_s=ts_seconds(batch.column("charttime")),
            value=batch.column("valuenum").to_numpy(zero_copy_only=False),
            unit=reducer.unit_codes(batch.column("valueuom")),
            lo=batch.column("ref_range_lower").to_numpy(zero_copy_only=False),
            hi=batch.column("ref_range_upper").to_numpy(zero_copy_only=False),
            tie=batch.column("labevent_id").fill_null(np.iinfo(np.int64).max).to_numpy(),
        )
    stats["pairs_in_window"] = reducer.pairs_in_window
    return reducer, dict(stats)


def nearest_vitals(vitalsign: Path, study_subject: np.ndarray, study_time: np.ndarray,
                   window_hours: float) -> tuple[NearestBefore, dict[str, int]]:
    """Stream ED vitalsign (wide: one column per vital) into the same reducer, one item per vital."""
    reducer = NearestBefore(study_subject, study_time, len(VITALS), window_hours * 3600)
    unit_codes = [reducer.unit_code(unit) for _, unit in VITALS.values()]
    subjects = pa.array(np.unique(study_subject), pa.int64())
    stats = Counter()

    def keep(batch: pa.RecordBatch) -> pa.Array:
        stats["blocks_read"] += 1
        stats["rows_scanned"] += batch.num_rows
        return pc.and_(pc.is_in(batch.column("subject_id"), value_set=subjects), pc.is_valid(batch.column("charttime")))

    for batch in stream_csv(vitalsign, VITALSIGN[1], keep=keep, desc="vitalsign"):
        stats["rows_kept"] += batch.num_rows
        subject = batch.column("subject_id").to_numpy()
        time_s = ts_seconds(batch.column("charttime"))
        tie = batch.column("stay_id").fill_null(np.iinfo(np.int64).max).to_numpy()  # same charttime: lowest stay
        for i, column in enumerate(VITALS):
            values = batch.column(column).to_numpy(zero_copy_only=False)
            present = ~np.isnan(values)
            n = int(present.sum())
            if not n:
                continue
            nan = np.full(n, np.nan)
            reducer.update(subject[present], np.full(n, i, np.int64), time_s[present], values[present],
                           np.full(n, unit_codes[i], np.int32), nan, nan, tie[present])
    stats["pairs_in_window"] = reducer.pairs_in_window
    return reducer, dict(stats)


# --------------------------------------------------------------------------------------------- studies
@dataclass
class Study:
    subject_id: int
    study_id: int
    dicom_id: str
    view: str
    split: str
    time_s: int
    chexpert: tuple[float | None, ...] = ()
    impression: str = ""
    impression_source: str = ""
    hadm_id: int | None = None
    ehr: dict[str, Any] = field(default_factory=dict)
    icd: dict[str, bool] = field(default_factory=dict)

    @property
    def image_relpath(self) -> str:
        return f"{study_relpath(self.subject_id, self.study_id)}/{self.dicom_id}.jpg"


def chexpert_block(values: tuple[float | None, ...], unmentioned: str) -> dict[str, str]:
    """Label -> Positive/Negative/Uncertain in CHEXPERT_LABELS order; blank is omitted or Negative, never Uncertain."""
    block: dict[str, str] = {}
    for label, v in zip(CHEXPERT_LABELS, values):
        if v is None:
            if unmentioned == "negative":
                block[label] = "Negative"
        else:
            block[label] = CHEXPERT_RENDER[v]
    return block


def select_images(path: Path, views: tuple[str, ...], selectors: tuple[str, ...], report: dict) -> dict[int, tuple]:
    """study_id -> (subject_id, dicom_id, view, StudyDate, StudyTime) of the preferred-view image."""
    table = read_csv(path, METADATA[1], desc="metadata")
    rank = {v.upper(): i for i, v in enumerate(views)}
    best: dict[int, tuple] = {}
    study_subject: dict[int, int] = {}
    n_rows = 0
    for dicom, subject, study, view, date, time in zip(*(table.column(c).to_pylist() for c in METADATA[1])):
        if subject is None or study is None or dicom is None:
            raise LauncherError(f"{path}: a row has a blank dicom_id/subject_id/study_id (dicom_id {dicom!r})")
        if not subject_selected(subject, selectors):
            continue
        n_rows += 1
        if study_subject.setdefault(study, subject) != subject:
            raise LauncherError(f"{path}: study_id {study} belongs to subjects {study_subject[study]} and {subject}")
        r = rank.get((view or "").strip().upper())
        if r is None:
            continue
        key = (r, dicom)
        if study not in best or key < best[study][0]:
            best[study] = (key, (subject, dicom, (view or "").strip().upper(), date, time))
    report["metadata_images"] = n_rows
    report["metadata_studies"] = len(study_subject)
    report["dropped"]["no_preferred_view"] = len(study_subject) - len(best)
    return {study: v for study, (_, v) in best.items()}


def read_split(path: Path, selectors: tuple[str, ...]) -> tuple[dict[str, str], dict[int, set[str]]]:
    """(dicom_id -> split, study_id -> splits of its images)."""
    table = read_csv(path, SPLIT[1], desc="split")
    by_dicom: dict[str, str] = {}
    by_study: dict[int, set[str]] = defaultdict(set)
    for dicom, study, subject, split in zip(*(table.column(c).to_pylist() for c in SPLIT[1])):
        if not subject_selected(subject, selectors):
            continue
        if split not in SPLIT_FILES:
            raise LauncherError(f"{path}: column 'split': unexpected value {split!r} for dicom_id {dicom} "
                                f"(expected one of {sorted(SPLIT_FILES)})")
        by_dicom[dicom] = split
        by_study[study].add(split)
    return by_dicom, by_study


def read_chexpert(path: Path, selectors: tuple[str, ...]) -> dict[int, tuple[float | None, ...]]:
    table = read_csv(path, CHEXPERT[1], desc="chexpert")
    columns = [table.column(c).to_pylist() for c in CHEXPERT[1]]
    out: dict[int, tuple[float | None, ...]] = {}
    for row in zip(*columns):
        subject, study, values = row[0], row[1], row[2:]
        if not subject_selected(subject, selectors):
            continue
        for label, v in zip(CHEXPERT_LABELS, values):
            if v is not None and v not in CHEXPERT_RENDER:
                raise LauncherError(f"{path}: column '{label}': unexpected value {v} for study_id {study} "
                                    "(expected 1.0, 0.0, -1.0 or blank)")
        if study in out:
            raise LauncherError(f"{path}: study_id {study} appears twice")
        out[study] = tuple(values)
    return out


def subfolder(root: str | Path, name: str) -> Path:
    """root/name when it exists (the release layout), else root (pointed at that folder itself)."""
    root = Path(root)
    return root / name if (root / name).is_dir() else root


def select_studies(opts: BuildOptions, report: dict) -> list[Study]:
    """Steps 1-3: image by view, split, CheXpert, report text; sorted by (subject_id, study_id)."""
    cxr = Path(opts.cxr_jpg)
    images = select_images(locate(cxr, METADATA[0], "--cxr-jpg"), opts.views, opts.subjects, report)
    split_by_dicom, split_by_study = read_split(locate(cxr, SPLIT[0], "--cxr-jpg"), opts.subjects)
    chexpert = read_chexpert(locate(cxr, CHEXPERT[0], "--cxr-jpg"), opts.subjects)
    image_root, report_root = subfolder(cxr, "files"), subfolder(opts.reports, "files")
    dropped = report["dropped"]
    sources: Counter = Counter()
    kept: list[Study] = []
    candidates = sorted(images.items(), key=lambda kv: (kv[1][0], kv[0]))
    examined = 0
    for study_id, (subject, dicom, view, date, time) in tqdm(candidates, desc="studies", disable=None, leave=False):
        if opts.max_studies and len(kept) >= opts.max_studies:
            break
        examined += 1
        split = split_by_dicom.get(dicom)
        if split is None:
            dropped["not_in_split_file"] += 1
            continue
        if len(split_by_study.get(study_id, ())) > 1:
            raise LauncherError(f"{SPLIT[0]}: study {study_id} has images in splits {sorted(split_by_study[study_id])}")
        labels = chexpert.get(study_id)
        if labels is None:
            dropped["no_chexpert_row"] += 1
            continue
        rel = study_relpath(subject, study_id)
        if not (image_root / rel.removeprefix("files/") / f"{dicom}.jpg").is_file():
            dropped["image_file_missing"] += 1
            continue
        report_path = report_root / f"{rel.removeprefix('files/')}.txt"
        try:
            text = report_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            dropped["report_file_missing"] += 1
            continue
        impression, source = extract_impression(text)
        if impression is None:
            dropped["no_usable_report_text"] += 1
            continue
        sources[source] += 1
        time_s = study_epoch_seconds(date, time, f"{METADATA[0]}: dicom_id {dicom}")
        kept.append(Study(subject, study_id, dicom, view, split, time_s, labels, impression, source))
    report["candidates_with_preferred_view"] = len(candidates)
    report["candidates_examined"] = examined
    report["stopped_at_max_studies"] = bool(opts.max_studies and examined < len(candidates))
    report["impression_source"] = dict(sorted(sources.items()))
    return kept


def check_patient_disjoint(studies: list[Study]) -> dict[str, int]:
    splits: dict[int, set[str]] = defaultdict(set)
    for s in studies:
        splits[s.subject_id].add(s.split)
    crossing = sorted(subj for subj, sp in splits.items() if len(sp) > 1)
    if crossing:
        shown = ", ".join(f"{s} ({'/'.join(sorted(splits[s]))})" for s in crossing[:5])
        raise LauncherError(f"{SPLIT[0]}: {len(crossing)} patient(s) in more than one split, e.g. {shown}; "
                            "train/val/test must be patient-disjoint (use the official split file unchanged)")
    return {"subjects": len(splits), "subjects_in_two_or_more_splits": 0}


# --------------------------------------------------------------------------------------------- EHR
def add_ehr(studies: list[Study], opts: BuildOptions, icd_map: IcdMap, report: dict) -> None:
    """Step 4: admission, ICD flags, chronic conditions, age/sex, labs and vitals; fills Study.ehr/.icd/.hadm_id."""
    hosp = Path(opts.mimic_iv)
    subs = ("hosp", "")
    subjects = np.array(sorted({s.subject_id for s in studies}), np.int64)
    keep = subject_filter(subjects)
    ehr_report = report["ehr"]

    patients = read_csv(locate(hosp, PATIENTS[0], "--mimic-iv", subs), PATIENTS[1], keep=keep, desc="patients")
    person = {s: (g, a, y) for s, g, a, y in zip(*(patients.column(c).to_pylist() for c in PATIENTS[1]))}

    adm_columns = dict(ADMISSIONS[1])
    if opts.admission_start == "edregtime":
        adm_columns["edregtime"] = TS
    adm_path = locate(hosp, ADMISSIONS[0], "--mimic-iv", subs)
    admissions = read_csv(adm_path, adm_columns, keep=keep, desc="admissions")
    by_subject: dict[int, list[tuple[int, int, int, str | None]]] = defaultdict(list)  # (start, end, hadm, type)
    cols = {c: admissions.column(c).to_pylist() for c in adm_columns}
    for i, (subject, hadm) in enumerate(zip(cols["subject_id"], cols["hadm_id"])):
        admit, disch = cols["admittime"][i], cols["dischtime"][i]
        if admit is None or disch is None or hadm is None:
            raise LauncherError(f"{adm_path}: admission {hadm} of subject {subject} has a blank hadm_id, admittime "
                                "or dischtime")
        start = admit
        if opts.admission_start == "edregtime" and cols["edregtime"][i] is not None:
            start = min(admit, cols["edregtime"][i])
        by_subject[subject].append((to_epoch_seconds(start), to_epoch_seconds(disch), hadm, cols["admission_type"][i]))

    dx_path = locate(hosp, DIAGNOSES[0], "--mimic-iv", subs)
    diagnoses = read_csv(dx_path, DIAGNOSES[1], keep=keep, desc="diagnoses_icd")
    codes_by_hadm: dict[int, set[tuple[int, str]]] = defaultdict(set)
    for hadm, code, version in zip(*(diagnoses.column(c).to_pylist() for c in ("hadm_id", "icd_code", "icd_version"))):
        if version not in (9, 10):
            raise LauncherError(f"{dx_path}: column 'icd_version': unexpected value {version} for hadm_id {hadm} "
                                "(expected 9 or 10)")
        if code:
            codes_by_hadm[hadm].add((version, code.replace(".", "").strip().upper()))

    cache: dict[tuple[str, int, str], list[str]] = {}

    def matched(table_name: str, hadm: int) -> set[str]:
        table = icd_map.flags if table_name == "flags" else icd_map.chronic
        out: set[str] = set()
        for version, code in codes_by_hadm.get(hadm, ()):
            k = (table_name, version, code)
            if k not in cache:
                cache[k] = icd_map.match(table, code, version)
            out.update(cache[k])
        return out

    # labs and vitals, streamed and reduced to one best row per (study, item)
    study_subject = np.array([s.subject_id for s in studies], np.int64)
    study_time = np.array([s.time_s for s in studies], np.int64)
    items, lab_names, missing_labs = resolve_lab_panel(locate(hosp, D_LABITEMS[0], "--mimic-iv", subs))
    ehr_report["lab_panel_not_in_d_labitems"] = missing_labs
    labs_reducer, lab_stats = nearest_labs(locate(hosp, LABEVENTS[0], "--mimic-iv", subs), items, len(lab_names),
                                           study_subject, study_time, opts.lab_window_hours)
    labs = labs_reducer.results(lab_names, with_range=True)
    ehr_report["labevents"] = lab_stats
    if opts.mimic_iv_ed:
        vit_path = locate(opts.mimic_iv_ed, VITALSIGN[0], "--mimic-iv-ed", ("ed", ""))
        vit_reducer, vit_stats = nearest_vitals(vit_path, study_subject, study_time, opts.vital_window_hours)
        vitals = vit_reducer.results([name for name, _ in VITALS.values()], with_range=False)
        ehr_report["vitalsign"] = vit_stats
    else:
        vitals = [{} for _ in studies]
        ehr_report["vitalsign"] = "not given (--mimic-iv-ed)"

    adm_counts: Counter = Counter()
    for i, s in enumerate(studies):
        adms = by_subject.get(s.subject_id, [])
        inside = sorted((a for a in adms if a[0] <= s.time_s <= a[1]), key=lambda a: (a[0], a[2]))
        if len(inside) > 1:
            adm_counts["inside_two_or_more_admissions_latest_start_used"] += 1
        current = inside[-1] if inside else None
        adm_counts["inside_an_admission" if current else "outside_every_admission"] += 1
        s.hadm_id = current[2] if current else None
        flags = matched("flags", current[2]) if current else set()
        s.icd = {f: True for f in icd_map.flags if f in flags}
        chronic: set[str] = set()
        for a in adms:
            if a[1] < s.time_s:  # discharged before the study (never the current admission, which contains it)
                chronic |= matched("chronic", a[2])
        g, anchor_age, anchor_year = person.get(s.subject_id, (None, None, None))
        age = None
        if anchor_age is not None and anchor_year is not None:
            age = anchor_age + epoch_year(s.time_s) - anchor_year  # MIMIC-IV's age at the study's (shifted) year
        if s.subject_id in person:
            adm_counts["patient_row_found"] += 1
        s.ehr = {
            "Age": age,
            "Sex": g if g in ("M", "F") else None,
            "Admission_type": current[3] if current else None,
            "Vitals": vitals[i],
            "Labs": labs[i],
            "O2_device": None,  # not in hosp/ED tables (it is in ICU chartevents); kept as the seed's field
            "Chronic_conditions": [c for c in icd_map.chronic if c in chronic],
        }
    ehr_report.update(dict(sorted(adm_counts.items())))
    ehr_report["studies_with_labs"] = sum(1 for x in labs if x)
    ehr_report["studies_with_vitals"] = sum(1 for x in vitals if x)


# --------------------------------------------------------------------------------------------- output
def place_image(src: Path, dest: Path, mode: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        if dest.exists() and os.path.samefile(src, dest) and not dest.is_symlink():
            return  # the output root is the image tree itself: never replace an original by a link to itself
        dest.unlink()
    if mode == "copy":
        shutil.copyfile(src, dest)
    else:
        os.symlink(src.resolve(), dest)


def records_of(s: Study, opts: BuildOptions) -> list[dict[str, str]]:
    chexpert = chexpert_block(s.chexpert, opts.unmentioned)
    base = {"study_id": str(s.study_id), "image": s.image_relpath}
    rows = [{**base, "prompt": prompt_a(), "target": target_a(s.impression, chexpert), "mode": STAGE_MODES["A"],
             "stage": "A"}]
    if s.hadm_id is not None or opts.no_admission == "icd-none":
        rows.append({**base, "prompt": prompt_b(s.ehr), "target": target_b(s.impression, chexpert, s.icd),
                     "mode": STAGE_MODES["B"], "stage": "B"})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def label_counts(studies: list[Study]) -> dict[str, dict[str, int]]:
    out = {label: Counter() for label in CHEXPERT_LABELS}
    for s in studies:
        for label, v in zip(CHEXPERT_LABELS, s.chexpert):
            out[label]["not_mentioned" if v is None else CHEXPERT_RENDER[v]] += 1
    keys = ("Positive", "Negative", "Uncertain", "not_mentioned")
    return {label: {k: c[k] for k in keys} for label, c in out.items()}


def locate_inputs(opts: BuildOptions) -> dict[str, str]:
    """Every input file, found before any work starts (a wrong folder fails in a second, not after the reports)."""
    found = {name: locate(opts.cxr_jpg, name, "--cxr-jpg") for name, _ in (METADATA, CHEXPERT, SPLIT)}
    for name, _ in (PATIENTS, ADMISSIONS, DIAGNOSES, D_LABITEMS, LABEVENTS):
        found[name] = locate(opts.mimic_iv, name, "--mimic-iv", ("hosp", ""))
    if opts.mimic_iv_ed:
        found[VITALSIGN[0]] = locate(opts.mimic_iv_ed, VITALSIGN[0], "--mimic-iv-ed", ("ed", ""))
    for flag, root in (("--cxr-jpg", opts.cxr_jpg), ("--reports", opts.reports)):
        if not subfolder(root, "files").is_dir():
            raise LauncherError(f"{flag} {root}: not a folder (expected the release's files/pXX/... tree under it)")
    return {name: str(path) for name, path in found.items()}


def build(opts: BuildOptions) -> dict[str, Any]:
    """Run every step and write OUT; returns the build report (also written to OUT/build_report.json)."""
    out = Path(opts.out)
    if out.resolve() in (Path(opts.cxr_jpg).resolve(), subfolder(opts.cxr_jpg, "files").resolve()):
        raise LauncherError(f"--out {out} is the MIMIC-CXR-JPG folder; choose a separate output folder")
    icd_map = load_icd_map(opts.icd_map)
    report: dict[str, Any] = {
        "options": asdict(opts),
        "inputs": locate_inputs(opts),
        "icd_map": {"path": str(opts.icd_map), "version": icd_map.version, "sha256": icd_map.sha256},
        "dropped": Counter(),
        "ehr": {},
    }
    for key in ("no_preferred_view", "not_in_split_file", "no_chexpert_row", "image_file_missing",
                "report_file_missing", "no_usable_report_text"):
        report["dropped"][key] = 0
    studies = select_studies(opts, report)
    if not studies:
        raise LauncherError("no study survived selection; see the counts: " + json.dumps(dict(report["dropped"])))
    report["split_check"] = check_patient_disjoint(studies)
    add_ehr(studies, opts, icd_map, report)

    out.mkdir(parents=True, exist_ok=True)
    image_root = subfolder(opts.cxr_jpg, "files")
    rows_by_split: dict[str, list[dict[str, str]]] = {split: [] for split in SPLIT_FILES}
    stage_b_skipped = 0
    for s in tqdm(studies, desc="images", disable=None, leave=False):
        src = image_root / s.image_relpath.removeprefix("files/")
        place_image(src, out / s.image_relpath, opts.image_mode)
        rows = records_of(s, opts)
        stage_b_skipped += len(rows) == 1
        rows_by_split[s.split].extend(rows)
    for split, name in SPLIT_FILES.items():
        write_jsonl(out / name, rows_by_split[split])

    report["dropped"] = dict(report["dropped"])
    report["kept_studies"] = len(studies)
    report["studies_per_split"] = {sp: sum(1 for s in studies if s.split == sp) for sp in SPLIT_FILES}
    report["stage_b_not_written_outside_every_admission"] = stage_b_skipped
    report["rows_written"] = {SPLIT_FILES[sp]: dict(Counter(r["stage"] for r in rows))
                              for sp, rows in rows_by_split.items()}
    report["chexpert_labels"] = label_counts(studies)
    report["icd_flags_positive"] = {f: sum(1 for s in studies if s.icd.get(f)) for f in icd_map.flags}
    report["funnel"] = funnel(report)
    tmp = out / "build_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "build_report.json")
    return report


def funnel(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The counts at each step, in order: studies in, dropped, why."""
    d = report["dropped"]
    n = report["metadata_studies"]
    steps = [("metadata studies (after --subjects)", n, 0, "")]
    n -= d["no_preferred_view"]
    steps.append(("with an image in --views", n, d["no_preferred_view"], "no image with a preferred ViewPosition"))
    unexamined = report["candidates_with_preferred_view"] - report["candidates_examined"]
    if unexamined:
        n -= unexamined
        steps.append(("examined before --max-studies was reached", n, unexamined, "--max-studies"))
    for key, why in (("not_in_split_file", "image not in the split file"),
                     ("no_chexpert_row", "study not in the CheXpert file"),
                     ("image_file_missing", "JPEG not on disk"),
                     ("report_file_missing", "report .txt not on disk"),
                     ("no_usable_report_text", "no IMPRESSION, FINDINGS or last paragraph with text")):
        n -= d[key]
        steps.append((f"after: {why}", n, d[key], key))
    return [{"step": s, "studies": k, "dropped": dr, "reason": r} for s, k, dr, r in steps]


def summary(report: dict[str, Any]) -> str:
    lines = ["MIMIC curriculum build", f"  ICD map {report['icd_map']['path']} version {report['icd_map']['version']}"]
    for step in report["funnel"]:
        dropped = f"  (-{step['dropped']} {step['reason']})" if step["dropped"] else ""
        lines.append(f"  {step['studies']:>8}  {step['step']}{dropped}")
    lines.append(f"  impression from: {report['impression_source']}")
    ehr = report["ehr"]
    lines.append(f"  admissions: {ehr.get('inside_an_admission', 0)} studies inside one, "
                 f"{ehr.get('outside_every_admission', 0)} outside every admission "
                 f"({report['stage_b_not_written_outside_every_admission']} Stage B rows not written)")
    lab = ehr.get("labevents", {})
    lines.append(f"  labevents: {lab.get('rows_scanned', 0)} rows scanned, {lab.get('rows_kept', 0)} of the panel "
                 f"and subjects, {ehr.get('studies_with_labs', 0)} studies with labs, "
                 f"{ehr.get('studies_with_vitals', 0)} with vitals")
    lines.append(f"  ICD flags: {report['icd_flags_positive']}")
    for name, counts in report["rows_written"].items():
        lines.append(f"  {name}: {sum(counts.values())} rows {counts}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI hooks
def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `launcher data build`."""
    parser.add_argument("--cxr-jpg", required=True, metavar="DIR",
                        help="MIMIC-CXR-JPG 2.x folder (mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz, files/)")
    parser.add_argument("--reports", required=True, metavar="DIR",
                        help="MIMIC-CXR folder with files/pXX/p<subject>/s<study>.txt")
    parser.add_argument("--mimic-iv", required=True, metavar="DIR", help="MIMIC-IV folder with hosp/*.csv.gz")
    parser.add_argument("--mimic-iv-ed", metavar="DIR", help="MIMIC-IV-ED folder with ed/vitalsign.csv.gz (vitals)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output data root (use as --data-root)")
    parser.add_argument("--subjects", metavar="LIST", help="subject folders to keep, e.g. p10 or p10,p11 (default all)")
    parser.add_argument("--views", default="PA,AP", help="ViewPosition preference, most preferred first")
    parser.add_argument("--max-studies", type=int, default=0, metavar="N", help="stop after N kept studies (0 = all)")
    parser.add_argument("--icd-map", default=str(DEFAULT_ICD_MAP), metavar="YAML", help="versioned ICD flag map (default: %(default)s; the original "
                        "project's eight flags: configs/icd_map_seed.yaml)")
    parser.add_argument("--unmentioned", choices=("omit", "negative"), default="omit",
                        help="CheXpert blank (not mentioned): omit from the block, or render Negative")
    parser.add_argument("--no-admission", choices=("stage-a-only", "icd-none"), default="stage-a-only",
                        help="a study inside no admission: no Stage B row, or Stage B with ICD findings None")
    parser.add_argument("--admission-start", choices=("admittime", "edregtime"), default="admittime",
                        help="admission window start: admittime, or the ED registration before it")
    parser.add_argument("--lab-window-hours", type=float, default=24.0)
    parser.add_argument("--vital-window-hours", type=float, default=24.0)
    parser.add_argument("--image-mode", choices=("symlink", "copy"), default="symlink")


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    views = tuple(v.strip().upper() for v in args.views.split(",") if v.strip())
    if not views:
        raise LauncherError("--views: give at least one ViewPosition, e.g. PA,AP")
    if args.max_studies < 0 or args.lab_window_hours <= 0 or args.vital_window_hours <= 0:
        raise LauncherError("--max-studies must be >= 0 and the window hours > 0")
    return BuildOptions(
        cxr_jpg=args.cxr_jpg, reports=args.reports, mimic_iv=args.mimic_iv, out=args.out,
        mimic_iv_ed=args.mimic_iv_ed, subjects=parse_subject_selectors(args.subjects), views=views,
        max_studies=args.max_studies, icd_map=args.icd_map, unmentioned=args.unmentioned,
        no_admission=args.no_admission, admission_start=args.admission_start,
        lab_window_hours=args.lab_window_hours, vital_window_hours=args.vital_window_hours,
        image_mode=args.image_mode,
    )


def run_build(args: argparse.Namespace) -> int:
    report = build(options_from_args(args))
    print(summary(report))
    print(f"  report: {Path(args.out) / 'build_report.json'}")
    return 0
