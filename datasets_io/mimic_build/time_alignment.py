"""Time alignment: every EHR fact is tied to the study by time, and nothing measured after the study is used.

- study times: StudyDate + StudyTime -> seconds since 1970, the clock of every MIMIC-IV timestamp (all shifted alike);
- admissions: the one whose window contains the study (`admission_containing`), and those discharged before it
  (`discharged_before`: the chronic conditions);
- measurements: `NearestBefore`, the lab or vital nearest BEFORE each study within a window, streamed.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasets_io.errors import LauncherError

EPOCH = datetime(1970, 1, 1)


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


def age_at(time_s: int, anchor_age: int | None, anchor_year: int | None) -> int | None:
    """MIMIC-IV's age at the study's (shifted) year: anchor_age + study year - anchor_year; None when unknown."""
    if anchor_age is None or anchor_year is None:
        return None
    return anchor_age + epoch_year(time_s) - anchor_year


def to_epoch_seconds(t: datetime) -> int:
    return int((t - EPOCH).total_seconds())


def ts_seconds(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """timestamp[s] column -> int64 seconds since 1970 (nulls must be filtered first)."""
    return np.asarray(column.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


# --------------------------------------------------------------------------------------------- admissions
class Admission(NamedTuple):
    """One hospital admission, its window in seconds since 1970 (start: admittime, or the ED registration before it)."""

    start_s: int
    end_s: int
    hadm_id: int
    admission_type: str | None


def admission_containing(admissions: list[Admission], time_s: int) -> tuple[Admission | None, int]:
    """(the admission whose window contains `time_s`, how many do): of several, the latest start (ties: hadm_id)."""
    inside = sorted((a for a in admissions if a.start_s <= time_s <= a.end_s), key=lambda a: (a.start_s, a.hadm_id))
    return (inside[-1] if inside else None), len(inside)


def discharged_before(admissions: list[Admission], time_s: int) -> list[Admission]:
    """The admissions that ended before `time_s` (never the current one, which contains it)."""
    return [a for a in admissions if a.end_s < time_s]


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
                entry: dict[str, Any] = {
                    "value": float(self.value[k]),
                    "unit": self.units[self.unit[k]] if self.unit[k] >= 0 else None,
                }
                if with_range:
                    lo, hi = self.lo[k], self.hi[k]
                    bounds = [None if np.isnan(b) else float(b) for b in (lo, hi)]
                    entry["reference_range"] = None if bounds == [None, None] else bounds
                entry["hours_before"] = round(float(self.delta[k]) / 3600.0, 1)
                block[name] = entry
            out.append(block)
        return out
