"""The Model Registry: pyfunc inputs, lineage (fast); a round trip on a tiny trained run against a sqlite store and a
real `mlflow server`, loading by alias in a NEW process and predicting (slow)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_ports
from datasets_io.errors import LauncherError
from test_evaluate import REGISTERED_ALIAS, REGISTERED_NAME, assert_no_patient_data, tiny_trained_run

# Run in a fresh interpreter from an unrelated directory: load by alias, predict one row with EHR (image as a path,
# which the model reads only when loaded with allow_local_paths) and one without (image as base64), and say where the
# project code was imported from.
LOAD_AND_PREDICT = r"""
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1], model_config={"allow_local_paths": True})
frame = pd.DataFrame({"image": [sys.argv[2], sys.argv[3]], "ehr": [sys.argv[4], None]})
out = model.predict(frame, params={"max_new_tokens": 6})
import training.model
print("RESULT " + json.dumps({"rows": out.to_dict("records"), "columns": list(out.columns),
                              "code_from": training.model.__file__}))
"""


# --------------------------------------------------------------------------------------------- fast
def test_pyfunc_input_parsing(tmp_path):
    """The basic shapes of a request; the bounds and the no-paths rule are in tests/test_serving.py."""
    import pandas as pd

    from training.pyfunc import InputError, ServingLimits, ehr_value, image_bytes, requests_from_frame

    limits = ServingLimits()
    jpg = tmp_path / "x.jpg"
    jpg.write_bytes(b"\xff\xd8fake")
    assert image_bytes(base64.b64encode(b"\xff\xd8abc").decode(), limits) == b"\xff\xd8abc"
    assert image_bytes(b"raw", limits) == b"raw"
    with pytest.raises(InputError, match="`image` is not valid base64; the served model does not read file paths"):
        image_bytes(str(jpg), limits)  # a path is read only when asked for, in process
    assert image_bytes(str(jpg), ServingLimits(allow_local_paths=True)) == b"\xff\xd8fake"
    assert all(ehr_value(none, limits) is None for none in (None, float("nan"), " "))
    assert ehr_value("{}", limits) == {} and ehr_value('{"Age": 70}', limits) == {"Age": 70}
    with pytest.raises(InputError, match="`ehr` is not valid JSON"):
        ehr_value("{bad", limits)
    with pytest.raises(InputError, match="JSON object"):
        ehr_value("[1]", limits)

    from mlflow.exceptions import MlflowException
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    assert requests_from_frame(pd.DataFrame({"image": [png]})) == [(buf.getvalue(), None)]
    with pytest.raises(MlflowException, match="row 0: `image` is not a JPEG or PNG image"):
        requests_from_frame(pd.DataFrame({"image": [str(jpg)]}), ServingLimits(allow_local_paths=True))
    with pytest.raises(MlflowException, match="`image` column"):
        requests_from_frame(pd.DataFrame({"picture": [png]}))


def test_lineage_pieces(tmp_path):
    from training.registry import pip_requirements, stage_bundle, stage_code, stage_end_metrics

    reqs = pip_requirements()
    names = {r.split("==")[0] for r in reqs}
    assert {"mlflow", "torch", "transformers", "peft", "pillow"} <= names
    assert not any("+" in r for r in reqs) and "torchvision" not in names
    code = stage_code(tmp_path / "code")
    assert [Path(c).name for c in code] == ["datasets_io", "training", "launcher"]
    assert (tmp_path / "code" / "training" / "pyfunc.py").is_file() and not list(tmp_path.rglob("__pycache__"))
    ckpt = tmp_path / "ckpt"
    (ckpt / "engine_state").mkdir(parents=True)
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "config.yaml",
        "trainer_state.json",
        "optimizer.safetensors",
        "rng_state.safetensors",
    ):
        (ckpt / name).write_text("x")
    staged = stage_bundle(ckpt, tmp_path / "staged")  # only what inference needs goes to the registry
    assert sorted(p.name for p in staged.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.yaml",
        "tokenizer.json",
        "trainer_state.json",
    ]
    state = {
        "global_step": 6,
        "stage_switch_step": 2,
        "losses": [3.0, 2.5],
        "val_history": [{"step": 2, "val/loss_A": 3.25}, {"step": 6, "val/loss_A": 2.5, "val/loss_B": 2.75}],
    }
    assert stage_end_metrics(state) == {
        "metrics.stage_A_end.val_loss_A": "3.25",
        "metrics.checkpoint.val_loss_A": "2.5",
        "metrics.checkpoint.val_loss_B": "2.75",
        "metrics.checkpoint.train_loss": "2.5",
    }


@pytest.mark.parametrize("before", ["unset", "env", "global"])
def test_registering_leaves_no_tracking_target_behind(before, tmp_path, monkeypatch):
    """Inside the block the fluent API (and subprocesses) write to the target store; after it, the next fluent run
    in this process goes where it went before, and the environment is as it was."""
    import mlflow

    from training.tracking import TrackingTarget

    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(k, "")  # recorded, so the teardown puts back what was there (mlflow sets them below)
        monkeypatch.delenv(k)
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    prev, target = f"sqlite:///{tmp_path / 'prev.db'}", f"sqlite:///{tmp_path / 'target.db'}"
    if before == "env":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", prev)
    elif before == "global":
        mlflow.set_tracking_uri(prev)

    def state() -> tuple:
        return (
            mlflow.get_tracking_uri(),
            mlflow.get_registry_uri(),
            os.environ.get("MLFLOW_TRACKING_URI"),
            os.environ.get("MLFLOW_REGISTRY_URI"),
        )

    expected = state()
    try:
        with TrackingTarget(target):
            assert state() == (target, target, target, target)
            with mlflow.start_run() as inside:
                pass
        assert state() == expected
        assert mlflow.MlflowClient(target).get_run(inside.info.run_id).info.status == "FINISHED"
        if before != "unset":  # the next run lands in the previous store (unset: ./mlruns of the cwd, not written)
            with mlflow.start_run() as after:
                pass
            assert mlflow.MlflowClient(prev).get_run(after.info.run_id).info.run_id == after.info.run_id
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def test_register_errors_are_actionable(tmp_path):
    from training.registry import register_checkpoint

    with pytest.raises(LauncherError, match="not an adapter bundle"):
        register_checkpoint(tmp_path, "m")
    with pytest.raises(LauncherError, match="not reachable"):
        from training.tracking import resolve_store

        resolve_store(f"http://127.0.0.1:{free_ports(1)[0]}")


# --------------------------------------------------------------------------------------------- slow
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server on sqlite + a local artifact store, stopped by PID with SIGTERM. Started when first
    requested and not waited for here, so its ~20 s boot overlaps the sqlite test."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_ports(1)[0]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    yield {"uri": f"http://127.0.0.1:{port}", "proc": proc, "log": root / "server.log"}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def _wait_healthy(server: dict, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert server["proc"].poll() is None, "mlflow server exited:\n" + server["log"].read_text()[-3000:]
        try:
            with urllib.request.urlopen(server["uri"] + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError("mlflow server did not answer /health:\n" + server["log"].read_text()[-3000:])


def _load_in_new_process(model_uri: str, tracking_uri: str, synth_dir: Path, cwd: Path) -> dict:
    """The registered model, loaded by a fresh interpreter that is not in the project directory."""
    from datasets_io.records import ehr_from_prompt

    row = next(
        json.loads(line)
        for line in (synth_dir / "curriculum_val.jsonl").read_text().splitlines()
        if json.loads(line)["stage"] == "B"
    )
    image = synth_dir / row["image"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_REGISTRY_URI")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_AND_PREDICT,
            model_uri,
            str(image),
            base64.b64encode(image.read_bytes()).decode(),
            json.dumps(ehr_from_prompt(row["prompt"])),
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _check_prediction(result: dict) -> None:
    assert result["columns"] == ["report", "valid", "problems", "impression", "chexpert", "icd"]
    with_ehr, without = result["rows"]
    assert isinstance(with_ehr["report"], str) and isinstance(with_ehr["valid"], bool)
    assert isinstance(json.loads(with_ehr["problems"]), list)
    if not without["valid"]:
        assert json.loads(without["problems"])
    assert without["icd"] is None  # no EHR: the Stage A prompt, which answers no ICD
    # The project code came with the model (code_paths), not from the working tree.
    assert result["code_from"].endswith("/code/training/model.py")
    assert not result["code_from"].startswith(str(Path(__file__).resolve().parents[1]))


@pytest.mark.slow
def test_register_at_end_and_load_by_alias_in_a_new_process(
    synth_dir, tmp_path_factory, tmp_path, mlflow_server, capsys
):
    import mlflow

    from datasets_io.config import config_hash, load_config

    run = tiny_trained_run(synth_dir, tmp_path_factory)
    summary = json.loads((run / "run_summary.json").read_text())
    reg = summary["registered"]
    assert reg["name"] == REGISTERED_NAME and reg["alias"] == REGISTERED_ALIAS
    assert reg["run_id"] == summary["mlflow_run_id"]  # logged in the training run
    uri = f"sqlite:///{run / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version_by_alias(REGISTERED_NAME, REGISTERED_ALIAS)
    assert str(version.version) == reg["version"]
    final = run / "checkpoints" / "final"
    tags = version.tags
    assert tags["config_hash"] == config_hash(load_config(final / "config.yaml"))
    for name in ("train", "val"):
        data = (synth_dir / f"curriculum_{name}.jsonl").read_bytes()
        assert tags[f"data.{name}_file.sha256"] == hashlib.sha256(data).hexdigest()
    assert tags["base_model"] == str(run / "base_model") and tags["training_run_id"] == summary["mlflow_run_id"]
    assert tags["checkpoint.step"] == "6" and tags["checkpoint.stage_switch_step"] == "2"
    assert len(tags["git_commit"]) == 40 and "metrics.checkpoint.train_loss" in tags

    model_uri = f"models:/{REGISTERED_NAME}@{REGISTERED_ALIAS}"
    result = _load_in_new_process(model_uri, uri, synth_dir, tmp_path)
    _check_prediction(result)
    _predict_and_evaluate_commands(model_uri, uri, final, synth_dir, tmp_path, capsys)
    assert_no_patient_data(uri, [synth_dir / "curriculum_val.jsonl", synth_dir / "curriculum_train.jsonl"])


def _predict_and_evaluate_commands(
    model_uri: str, uri: str, final: Path, synth_dir: Path, tmp_path: Path, capsys
) -> None:
    """`launcher predict` from the registry and from the checkpoint agree; `launcher evaluate --model` runs."""
    from datasets_io.records import ehr_from_prompt
    from launcher.cli import main

    row = next(
        json.loads(line)
        for line in (synth_dir / "curriculum_val.jsonl").read_text().splitlines()
        if json.loads(line)["stage"] == "B"
    )
    ehr_file = tmp_path / "ehr.json"
    ehr_file.write_text(json.dumps(ehr_from_prompt(row["prompt"])))
    common = [
        "predict",
        "--image",
        str(synth_dir / row["image"]),
        "--ehr",
        str(ehr_file),
        "--format",
        "json",
        "--max-new-tokens",
        "5",
    ]
    answers = []
    for source in (["--model", model_uri, "--tracking-uri", uri], ["--checkpoint", str(final)]):
        capsys.readouterr()
        assert main([*common, *source]) == 0
        out = capsys.readouterr().out
        answers.append(json.loads(out[out.index("{\n") :]))
    assert answers[0] == answers[1]  # the registered model is the checkpoint
    assert set(answers[0]) == {"report", "valid", "problems", "impression", "chexpert", "icd"}

    out_dir = tmp_path / "eval_registered"
    assert (
        main(
            [
                "evaluate",
                "--model",
                model_uri,
                "--tracking-uri",
                uri,
                "--data",
                str(synth_dir / "curriculum_val.jsonl"),
                "--limit",
                "2",
                "--max-new-tokens",
                "4",
                "--bootstrap",
                "50",
                "--no-progress",
                "--out",
                str(out_dir),
            ]
        )
        == 0
    )
    m = json.loads((out_dir / "metrics.json").read_text())
    assert m["evaluation"]["models"] == {"model": model_uri} and m["baseline"]["fit_on"] == "training data"
    assert m["models"]["model"]["arms"]["ehr_on"]["n"] == 2


@pytest.mark.slow
def test_register_command_against_a_tracking_server(synth_dir, tmp_path_factory, tmp_path, mlflow_server, capsys):
    from launcher.cli import main

    run = tiny_trained_run(synth_dir, tmp_path_factory)
    _wait_healthy(mlflow_server)
    uri = mlflow_server["uri"]
    import mlflow

    before = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
    assert (
        main(
            [
                "register",
                "--checkpoint",
                str(run / "checkpoints" / "final"),
                "--name",
                "cxr-srv",
                "--alias",
                "prod",
                "--tracking-uri",
                uri,
            ]
        )
        == 0
    )
    # the server stays this command's: the next run in this process goes where it went before
    assert (
        mlflow.get_tracking_uri(),
        os.environ.get("MLFLOW_TRACKING_URI"),
        os.environ.get("MLFLOW_REGISTRY_URI"),
    ) == before
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{\n") :])  # libraries may log to stdout before it
    assert info["version"] == "1" and info["tracking_uri"] == uri and info["alias"] == "prod"

    client = mlflow.MlflowClient(uri)
    assert str(client.get_model_version_by_alias("cxr-srv", "prod").version) == "1"
    reg_run = client.get_run(info["run_id"])  # the training run is not in this store: a registration run
    assert reg_run.data.tags["kind"] == "registration"

    result = _load_in_new_process("models:/cxr-srv@prod", uri, synth_dir, tmp_path)
    _check_prediction(result)
    assert_no_patient_data(uri, [synth_dir / "curriculum_val.jsonl", synth_dir / "curriculum_train.jsonl"])
