"""The versioned ICD map (configs/icd_map.yaml, configs/icd_map_seed.yaml): ICD-9 and ICD-10 prefixes (no dots) per
Stage B flag and per chronic condition. The map defines the ICD label space of the curriculum."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from datasets_io.errors import LauncherError

PrefixTable = dict[str, dict[int, tuple[str, ...]]]  # name -> ICD version (9, 10) -> code prefixes


@dataclass(frozen=True)
class IcdMap:
    """Prefix lists per flag and ICD version (codes without dots), plus the chronic-condition lists."""

    version: str
    sha256: str
    flags: PrefixTable
    chronic: PrefixTable

    @staticmethod
    def match(table: PrefixTable, code: str, version: int) -> list[str]:
        """Names in `table` with a prefix of `code` among the prefixes of its ICD version."""
        return [
            name
            for name, by_version in table.items()
            if by_version.get(version) and code.startswith(by_version[version])
        ]


def load_icd_map(path: str | Path) -> IcdMap:
    """Load and validate the ICD map: every problem is reported at once, naming its key."""
    path = Path(path)
    text, data = _read_yaml(path)
    problems: list[str] = []
    if not isinstance(data, dict):
        raise LauncherError(f"{path}: expected a mapping with version, flags, chronic_conditions")
    for key in sorted(set(data) - {"version", "flags", "chronic_conditions"}):
        problems.append(f"unknown key '{key}'")
    if not isinstance(data.get("version"), (str, int, float)):
        problems.append("'version' is required (a string such as \"1.0\")")
    flags = _prefix_table(data, "flags", problems)  # the map defines the label space
    chronic = _prefix_table(data, "chronic_conditions", problems)
    if isinstance(data.get("flags"), dict) and not data["flags"]:
        problems.append("'flags' is empty: name at least one flag")
    if problems:
        raise LauncherError(f"{path}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return IcdMap(str(data["version"]), hashlib.sha256(text.encode()).hexdigest(), flags, chronic)


def _read_yaml(path: Path) -> tuple[str, Any]:
    """(the file's text, for its hash; the parsed YAML)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise LauncherError(f"--icd-map {path}: cannot read ({e.strerror})") from None
    try:
        return text, yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise LauncherError(f"--icd-map {path}: not valid YAML ({e})") from None


def _prefix_table(data: dict, name: str, problems: list[str]) -> PrefixTable:
    """The section `name` ({entry: {description, icd9, icd10}}) as a PrefixTable; problems are appended."""
    raw = data.get(name)
    out: PrefixTable = {}
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


class AdmissionCodes:
    """The ICD codes of each admission (hadm_id -> {(version, undotted code)}), matched against the map: each distinct
    (table, version, code) is matched once, however many admissions carry it."""

    def __init__(self, icd_map: IcdMap, codes_by_hadm: dict[int, set[tuple[int, str]]]):
        self.icd_map, self.codes_by_hadm = icd_map, codes_by_hadm
        self._cache: dict[tuple[str, int, str], list[str]] = {}

    def matched(self, table_name: str, hadm: int) -> set[str]:
        """Names of `table_name` ("flags" or "chronic") that the admission's codes match."""
        table = self.icd_map.flags if table_name == "flags" else self.icd_map.chronic
        out: set[str] = set()
        for version, code in self.codes_by_hadm.get(hadm, ()):
            k = (table_name, version, code)
            if k not in self._cache:
                self._cache[k] = IcdMap.match(table, code, version)
            out.update(self._cache[k])
        return out
