"""The raw PhysioNet release files: where each is found, the columns read from it, and a streaming CSV reader whose
memory does not grow with the file (labevents.csv.gz is tens of GB)."""

from __future__ import annotations

import csv
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm import tqdm

from datasets_io.errors import LauncherError
from datasets_io.records import CHEXPERT_LABELS

# The raw files and the columns read from each, with their Arrow types (all other columns are skipped while parsing).
I64, F64, STR, TS = "int64", "double", "string", "timestamp[s]"
METADATA = (
    "mimic-cxr-2.0.0-metadata.csv.gz",
    {"dicom_id": STR, "subject_id": I64, "study_id": I64, "ViewPosition": STR, "StudyDate": I64, "StudyTime": F64},
)
CHEXPERT = (
    "mimic-cxr-2.0.0-chexpert.csv.gz",
    {"subject_id": I64, "study_id": I64, **{label: F64 for label in CHEXPERT_LABELS}},
)
SPLIT = ("mimic-cxr-2.0.0-split.csv.gz", {"dicom_id": STR, "study_id": I64, "subject_id": I64, "split": STR})
PATIENTS = ("patients.csv.gz", {"subject_id": I64, "gender": STR, "anchor_age": I64, "anchor_year": I64})
ADMISSIONS = (
    "admissions.csv.gz",
    {"subject_id": I64, "hadm_id": I64, "admittime": TS, "dischtime": TS, "admission_type": STR},
)
DIAGNOSES = ("diagnoses_icd.csv.gz", {"subject_id": I64, "hadm_id": I64, "icd_code": STR, "icd_version": I64})
D_LABITEMS = ("d_labitems.csv.gz", {"itemid": I64, "label": STR, "fluid": STR})
LABEVENTS = (
    "labevents.csv.gz",
    {
        "labevent_id": I64,
        "subject_id": I64,
        "itemid": I64,
        "charttime": TS,
        "valuenum": F64,
        "valueuom": STR,
        "ref_range_lower": F64,
        "ref_range_upper": F64,
    },
)
VITALSIGN = (
    "vitalsign.csv.gz",
    {
        "subject_id": I64,
        "stay_id": I64,
        "charttime": TS,
        "temperature": F64,
        "heartrate": F64,
        "resprate": F64,
        "o2sat": F64,
        "sbp": F64,
        "dbp": F64,
    },
)
Keep = Callable[[pa.RecordBatch], pa.Array]  # a batch -> the boolean mask of its rows to keep
HOSP_DIRS = ("hosp", "")  # where --mimic-iv's files may be: its hosp/ folder, or the folder itself
ED_DIRS = ("ed", "")  # the same for --mimic-iv-ed


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
    raise LauncherError(
        f"{flag} {root}: {name} not found (looked for {', '.join(tried)}); point {flag} at the "
        "folder of the PhysioNet release that holds it"
    )


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
    keep: Keep | None = None,
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
    bar = tqdm(
        total=os.path.getsize(path),
        unit="B",
        unit_scale=True,
        desc=desc,
        disable=None if desc else True,
        leave=False,
        file=sys.stderr,
    )
    try:
        try:
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=block_size),
                convert_options=pacsv.ConvertOptions(
                    include_columns=list(columns), column_types=types, strings_can_be_null=True
                ),
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
    """The whole (filtered) file as one table: for the small files; `kw` as for stream_csv."""
    schema = pa.schema([(name, pa.type_for_alias(alias)) for name, alias in columns.items()])
    return pa.Table.from_batches(list(stream_csv(path, columns, **kw)), schema=schema)


def subject_filter(subjects: np.ndarray) -> Keep:
    """Keep the rows of these subject_ids."""
    value_set = pa.array(subjects, type=pa.int64())
    return lambda batch: pc.is_in(batch.column("subject_id"), value_set=value_set)


def subfolder(root: str | Path, name: str) -> Path:
    """root/name when it exists (the release layout), else root (pointed at that folder itself)."""
    root = Path(root)
    return root / name if (root / name).is_dir() else root
