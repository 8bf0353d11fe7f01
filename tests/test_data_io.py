"""Reading the curriculum: file:line errors for every bad-input kind, the skip policy, BOM/blank tolerance, the CLI."""

import json
import shutil
from pathlib import Path

import pytest

from datasets_io.jsonl import read_records
from datasets_io.records import RecordError
from launcher.cli import main as cli


@pytest.fixture
def data(synth_dir, tmp_path) -> tuple[Path, list[str]]:
    """A private copy of the synthetic curriculum (tests corrupt it)."""
    root = tmp_path / "data"
    shutil.copytree(synth_dir, root)
    lines = (root / "curriculum_train.jsonl").read_text().splitlines()
    return root, lines


def write(root: Path, lines: list[str | bytes], name="bad.jsonl") -> str:
    path = root / name
    path.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    return str(path)


def test_good_file_reads_every_row(data):
    root, lines = data
    records, report = read_records(str(root / "curriculum_train.jsonl"), str(root), check_images="decode")
    assert len(records) == len(lines) == report.rows
    assert report.per_stage["A"] == report.per_stage["B"] == len(lines) // 2


def test_bom_and_blank_lines_are_tolerated(data):
    root, lines = data
    path = write(root, [b"\xef\xbb\xbf" + lines[0].encode(), "", "   ", lines[1] + "\r"])
    records, report = read_records(path, str(root))
    assert len(records) == 2 and report.blank_lines == 2


@pytest.mark.parametrize(
    "make_bad, field, reason",
    [
        (lambda l, root: l.encode()[:-7] + b"\xff\xfe", "<line>", "invalid UTF-8"),
        (lambda l, root: l[: len(l) // 2], "<json>", "invalid JSON"),
        (lambda l, root: json.dumps({**json.loads(l), "image": "files/missing.jpg"}), "image", "image not found"),
        (lambda l, root: json.dumps({**json.loads(l), "stage": "B"}), "mode", "stage B goes with"),
        (lambda l, root: "[1, 2]", "<record>", "expected a JSON object"),
    ],
    ids=["invalid-utf8", "truncated-json", "missing-image", "stage-mode-mismatch", "not-an-object"],
)
def test_each_bad_input_kind_names_file_line_field(data, make_bad, field, reason):
    root, lines = data
    path = write(root, [lines[0], lines[1], make_bad(lines[2], root), lines[3]])
    with pytest.raises(RecordError) as e:
        read_records(path, str(root), check_images="decode")
    assert e.value.where == f"{path}:3" and e.value.field == field and reason in e.value.reason
    records, report = read_records(path, str(root), policy="skip", check_images="decode")
    assert len(records) == 3 and report.skipped == 1 and report.problems[0].startswith(f"{path}:3:")


def test_corrupt_image_is_an_error_naming_the_line(data):
    root, lines = data
    image = root / json.loads(lines[2])["image"]  # lines 0 and 1 are one study (Stage A and B): another image
    image.write_bytes(image.read_bytes()[:200])  # truncated JPEG
    path = write(root, [lines[0], lines[2]])
    with pytest.raises(RecordError, match=r":2: field 'image': corrupt image"):
        read_records(path, str(root), check_images="decode")


def test_cli_validate_summary_and_exit_codes(data, capsys):
    root, lines = data
    good = str(root / "curriculum_train.jsonl")
    assert cli(["data", "validate", good, "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "rows per stage: A=" in out and "Cardiomegaly" in out and "EHR field coverage" in out
    bad = write(root, [lines[0], lines[1][:30]])
    assert cli(["data", "validate", bad, "--data-root", str(root)]) == 1
    captured = capsys.readouterr()
    assert f"{bad}:2: field '<json>'" in captured.out and "1 bad record" in captured.err
    assert cli(["data", "validate", bad, "--data-root", str(root), "--policy", "skip"]) == 0


def test_cli_validate_never_prints_patient_values(data, capsys):
    root, _ = data
    cli(["data", "validate", str(root / "curriculum_train.jsonl"), "--data-root", str(root)])
    out = capsys.readouterr().out
    assert "pg/mL" not in out and "Impression:" not in out
