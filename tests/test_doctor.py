"""`launcher doctor`: the real probes on this machine (CPU, no cluster), failing items that name themselves and say
what to do, and a real Ray head started here and found through RAY_ADDRESS."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_ports, running_ray_head

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _doctor(capsys, *args: str) -> tuple[int, dict[str, tuple[str, str]], str]:
    """Run the command in-process; returns (exit code, {check: (status, detail)}, the whole output)."""
    from launcher.cli import main

    rc = main(["doctor", *args])
    out = capsys.readouterr().out
    return rc, table_rows(out), out


def table_rows(out: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in out.splitlines()[1:]:
        parts = line.split("  ")
        cells = [p.strip() for p in parts if p.strip()]
        if len(cells) >= 3 and cells[1] in ("ok", "warn", "fail", "skip"):
            rows[cells[0]] = (cells[1], "  ".join(cells[2:]))
        elif not line.strip():
            break
    return rows


def _tiny_args(synth_dir: Path, out: Path, *extra: str) -> list[str]:
    sets = {"data.root": str(synth_dir), "data.synth_if_missing": "false", "output.dir": str(out)}
    args = ["--config", str(REPO / "configs" / "tiny.yaml")]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    for item in extra:
        args += ["--set", item]
    return args


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_this_machine_passes_with_the_right_lines(synth_dir, tmp_path, capsys, clean_env):
    rc, rows, out = _doctor(capsys, *_tiny_args(synth_dir, tmp_path / "run"))
    assert rc == 0, out
    assert list(rows) == [
        "python",
        "torch",
        "ray",
        "deepspeed",
        "mlflow",
        "data train_file",
        "data val_file",
        "base model",
        "disk",
    ]
    assert all(status == "ok" for status, _ in rows.values()), out
    assert rows["python"][1].startswith("3.11.")
    import torch

    assert rows["torch"][1].startswith(torch.__version__) and "cpu " in rows["torch"][1]
    assert ("cuda no" in rows["torch"][1]) == (not torch.cuda.is_available())
    assert "RAY_ADDRESS not set" in rows["ray"][1]
    assert "JIT on first use" in rows["deepspeed"][1]
    assert f"sqlite:///{(tmp_path / 'run').resolve()}/mlflow.db (created at the first run)" in rows["mlflow"][1]
    assert not (tmp_path / "run").exists(), "doctor writes nothing"
    assert "first 32 records valid, images decode" in rows["data train_file"][1]
    assert rows["base model"][1].startswith("tiny")
    assert "GB free" in rows["disk"][1] and "failing" not in out


def test_no_config_skips_the_config_lines(capsys, clean_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, rows, out = _doctor(capsys)
    assert rc == 0, out
    assert rows["data"][0] == rows["base model"][0] == "skip"


def test_unreachable_tracking_uri_fails_naming_it(synth_dir, tmp_path, capsys, clean_env):
    (port,) = free_ports(1)
    uri = f"http://127.0.0.1:{port}"
    rc, rows, out = _doctor(capsys, *_tiny_args(synth_dir, tmp_path / "run", f"mlflow.tracking_uri={uri}"))
    assert rc == 1
    assert rows["mlflow"][0] == "fail" and uri in rows["mlflow"][1]
    assert [k for k, (s, _) in rows.items() if s == "fail"] == ["mlflow"]
    summary = out[out.index("1 failing: mlflow") :]
    assert uri in summary and "->" in summary and "MLFLOW_TRACKING_URI" in summary  # what to do


def test_a_reachable_server_with_registered_models(tmp_path, capsys, clean_env, monkeypatch):
    """A sqlite store that exists is opened read-only: its registry answers."""
    import mlflow

    db = tmp_path / "mlflow.db"
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    client.create_registered_model("doctor-test")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    rc, rows, out = _doctor(capsys)
    assert rc == 0, out
    assert rows["mlflow"] == ("ok", f"{mlflow.__version__}; sqlite:///{db} reachable, registry: 1 registered model(s)")


def test_bad_record_and_incomplete_base_model_fail_with_what_to_do(synth_dir, tmp_path, capsys, clean_env):
    data = tmp_path / "data"
    data.mkdir()
    for entry in synth_dir.iterdir():  # the images shared, the JSONL copied
        if entry.suffix == ".jsonl":
            shutil.copy(entry, data / entry.name)
        else:
            (data / entry.name).symlink_to(entry)
    lines = (data / "curriculum_val.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["stage"] = "C"
    lines[1] = json.dumps(bad)
    (data / "curriculum_val.jsonl").write_text("\n".join(lines) + "\n")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llava"}')

    rc, rows, out = _doctor(capsys, *_tiny_args(data, tmp_path / "run", f"model.name_or_path={base}"))
    assert rc == 1
    assert rows["data train_file"][0] == "ok"
    assert rows["data val_file"][0] == "fail" and f"{data / 'curriculum_val.jsonl'}:2" in rows["data val_file"][1]
    assert rows["base model"][0] == "fail" and "no model.safetensors" in rows["base model"][1]
    assert "2 failing: data val_file, base model" in out
    assert "launcher data validate" in out and "launcher model convert-llava-med" in out


def test_bf16_on_a_cpu_only_machine_fails(synth_dir, tmp_path, capsys, clean_env):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the machine has a GPU: bf16 is fine")
    rc, rows, _ = _doctor(capsys, *_tiny_args(synth_dir, tmp_path / "run", "model.dtype=bf16"))
    assert rc == 1 and rows["torch"][0] == "fail" and "model.dtype=bf16" in rows["torch"][1]


@pytest.mark.slow
def test_started_local_cluster_is_found_through_ray_address(tmp_path):
    """`ray start --head` on free ports, `launcher doctor` in a fresh process with RAY_ADDRESS at its GCS and at its
    dashboard; then stop THAT head by PID (never `ray stop`)."""
    import ray

    results = {}
    with running_ray_head("rd", num_cpus=3, object_store_mb=300) as (env, ports):
        gcs, dash = ports["gcs"], ports["dashboard"]
        for address in (f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"):
            done = subprocess.run(
                [str(VENV_BIN / "launcher"), "doctor"],
                env={**env, "RAY_ADDRESS": address},
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=180,
            )
            results[address] = (done.returncode, table_rows(done.stdout), done.stdout + done.stderr)
    rc, rows, out = results[f"127.0.0.1:{gcs}"]
    assert rc == 0, out[-3000:]
    assert rows["ray"][0] == "ok" and f"cluster 127.0.0.1:{gcs}: 1 node(s), CPU 3, GPU 0" in rows["ray"][1]
    rc, rows, out = results[f"http://127.0.0.1:{dash}"]
    assert rc == 0, out[-3000:]
    v = ray.__version__
    assert rows["ray"] == (
        "ok",
        f"{v}; dashboard http://127.0.0.1:{dash} answers (Ray {v}); resources: `ray status --address` on the head",
    )


def test_a_stopped_cluster_fails_naming_the_address(capsys, monkeypatch):
    (port,) = free_ports(1)
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{port}")
    from launcher.commands.doctor import check_ray

    c = check_ray(os.environ["RAY_ADDRESS"])
    assert c.status == "fail" and f"RAY_ADDRESS=http://127.0.0.1:{port}" in c.detail and "ray start --head" in c.fix


def test_a_gcs_address_where_nothing_listens_fails_fast():
    """ray.init would retry for minutes; the TCP probe answers at once."""
    from launcher.commands.doctor import check_ray

    (port,) = free_ports(1)
    start = time.time()
    c = check_ray(f"127.0.0.1:{port}")
    assert c.status == "fail" and f"RAY_ADDRESS=127.0.0.1:{port}" in c.detail and time.time() - start < 10
