"""training/tracking.py, the one MLflow module, on a sqlite store: a one-shot run's writes and its status, MLflow's
batch limits, where a sqlite store keeps artifacts, and a resumed run logging no step twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from datasets_io.config import Config


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(uri)


def test_log_run_writes_everything_and_finishes(tmp_path):
    from training.tracking import METRICS_PER_BATCH, log_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    metrics = {f"m/{i}": i / 10 for i in range(METRICS_PER_BATCH + 5)}  # more than one log_batch holds
    run_id = log_run(
        uri,
        "exp",
        "eval-x",
        tags={"kind": "evaluation"},
        params={"eval.limit": 3, "long": "x" * 7000},
        metrics=metrics,
        files=[(report, "evaluation")],
    )

    run = _client(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "eval-x"
    assert run.data.tags["kind"] == "evaluation"
    assert run.data.params["eval.limit"] == "3" and len(run.data.params["long"]) == 6000  # MLflow's value limit
    assert run.data.metrics == pytest.approx(metrics)
    assert [a.path for a in _client(uri).list_artifacts(run_id, "evaluation")] == ["evaluation/report.md"]
    # a sqlite store keeps its artifacts next to the db (MLflow 3 refuses the plain file store)
    exp = _client(uri).get_experiment_by_name("exp")
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_a_failed_write_leaves_the_run_failed_and_raises(tmp_path):
    from training.tracking import log_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(FileNotFoundError):
        log_run(
            uri,
            "exp",
            "eval-x",
            tags={},
            params={"a": 1},
            metrics={"m": 1.0},
            files=[(tmp_path / "missing.md", "evaluation")],
        )
    client = _client(uri)
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_a_resumed_run_logs_each_step_once(tmp_path, monkeypatch):
    from training.tracking import MlflowTracker, ResumeSafeTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config()
    cfg.output.dir = str(tmp_path / "run")
    cfg.mlflow.tracking_uri = ""
    first = MlflowTracker.from_config(cfg, run_name="train")
    for step in range(5):
        first.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    first.close("KILLED")
    assert first.tracking_uri == f"sqlite:///{Path(cfg.output.dir).resolve()}/mlflow.db"

    client = _client(first.tracking_uri)
    rank = ResumeSafeTracker(MlflowTracker.from_config(cfg, run_id=first.run_id), close_run=False)
    assert "client" not in vars(rank.inner) and rank.run_id == first.run_id  # a Ray rank's: the store opens at its
    rank.log_metrics({"train/loss": 5.0}, step=4)  # first log, after its first step; still only new steps
    assert "client" in vars(rank.inner) and len(client.get_metric_history(first.run_id, "train/loss")) == 5
    again = MlflowTracker.from_config(cfg, run_id=first.run_id)
    again.reopen()  # a relaunched Ray run: the same run, RUNNING again
    assert again.run_id == first.run_id and client.get_run(first.run_id).info.status == "RUNNING"

    echoed = []
    resumed = ResumeSafeTracker(again, echo=lambda m, step: echoed.append(step))
    for step in range(3, 7):  # the steps after the checkpoint at 3 are trained again
        resumed.log_metrics({"train/loss": 9.0, "val/loss": 2.0}, step=step)
    resumed.close()

    history = {m.step: m.value for m in client.get_metric_history(first.run_id, "train/loss")}
    assert sorted(history) == [0, 1, 2, 3, 4, 5, 6] and history[4] == pytest.approx(0.2) and history[5] == 9.0
    assert [m.step for m in client.get_metric_history(first.run_id, "val/loss")] == [3, 4, 5, 6]  # a new key: all
    assert echoed == [3, 4, 5, 6]  # the echo (Ray's job log) sees every step
    assert client.get_run(first.run_id).info.status == "FINISHED"
