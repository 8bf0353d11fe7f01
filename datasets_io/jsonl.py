"""Reading the curriculum JSONL with file:line errors and an `error | skip` policy.

Paths may be local or any URI pyarrow's filesystems understand (`s3://bucket/x.jsonl`, `gs://...`), for the data
file and for the data root that image paths are relative to.

    records, report = read_records(["data/synth/curriculum_train.jsonl"], data_root="data/synth", policy="skip")
    print(report.summary())
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Literal

import pyarrow.fs as pafs
from PIL import Image, UnidentifiedImageError

from datasets_io.records import Record, RecordError, validate_record

Policy = Literal["error", "skip"]
ImageCheck = Literal["none", "exists", "decode"]


def resolve_fs(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/key."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(path)


def join(root: str, rel: str) -> str:
    return rel if "://" in rel or rel.startswith("/") else f"{root.rstrip('/')}/{rel}"


def read_bytes(path: str) -> bytes:
    fs, inner = resolve_fs(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def path_exists(path: str) -> bool:
    fs, inner = resolve_fs(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


@dataclass
class ReadReport:
    """What reading saw: rows kept, problems (each "file:line: field 'x': reason"), per-stage counts."""

    rows: int = 0
    skipped: int = 0
    blank_lines: int = 0
    problems: list[str] = field(default_factory=list)
    per_stage: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        stages = ", ".join(f"{k}={v}" for k, v in sorted(self.per_stage.items()))
        return f"{self.rows} records ({stages}); {self.skipped} skipped; {len(self.problems)} problems"


def check_image(path: str, where: str, how: ImageCheck) -> None:
    if how == "none":
        return
    if how == "exists":
        if not path_exists(path):
            raise RecordError(where, "image", f"image not found: {path}")
        return
    try:
        data = read_bytes(path)
    except (FileNotFoundError, OSError) as e:
        raise RecordError(where, "image", f"image not found or unreadable: {path} ({e.__class__.__name__})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("L", (64, 64))  # cheap: decode at 1/8 scale, enough to catch truncated/corrupt data
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise RecordError(where, "image", f"corrupt image {path}: {e}") from None


def iter_lines(path: str) -> Iterator[tuple[int, str | None, str | None]]:
    """Yield (line_no, text, problem). Tolerates a UTF-8 BOM and CRLF; invalid UTF-8 is a per-line problem."""
    data = read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.endswith(b"\n"):
        data = data[:-1]  # the final newline ends the last line; it does not start a blank one
    for i, raw in enumerate(data.split(b"\n") if data else [], start=1):
        try:
            yield i, raw.decode("utf-8").rstrip("\r"), None
        except UnicodeDecodeError as e:
            yield i, None, f"invalid UTF-8 at byte {e.start}"


def iter_records(
    path: str,
    data_root: str,
    *,
    policy: Policy = "error",
    check_images: ImageCheck = "exists",
    report: ReadReport | None = None,
) -> Iterator[Record]:
    """Validated records of one file. Under `error` the first bad record raises RecordError; under `skip` it is
    counted in `report` (never dropped silently)."""
    if policy not in ("error", "skip"):
        raise ValueError(f"policy must be 'error' or 'skip', got {policy!r}")
    report = report if report is not None else ReadReport()
    for line_no, text, problem in iter_lines(path):
        where = f"{path}:{line_no}"
        try:
            if problem:
                raise RecordError(where, "<line>", problem)
            if not text.strip():
                report.blank_lines += 1
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise RecordError(where, "<json>", f"invalid JSON ({e.msg} at column {e.colno})") from None
            record = validate_record(obj, where)
            check_image(join(data_root, record.image), where, check_images)
        except RecordError as e:
            if policy == "error":
                raise
            report.skipped += 1
            report.problems.append(str(e))
            continue
        report.rows += 1
        report.per_stage[record.stage] += 1
        yield record


def read_records(
    paths: list[str] | str,
    data_root: str,
    *,
    policy: Policy = "error",
    check_images: ImageCheck = "exists",
) -> tuple[list[Record], ReadReport]:
    paths = [paths] if isinstance(paths, str) else list(paths)
    report = ReadReport()
    records = [
        r for p in paths for r in iter_records(p, data_root, policy=policy, check_images=check_images, report=report)
    ]
    return records, report
