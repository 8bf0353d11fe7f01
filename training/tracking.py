"""Tracker Protocol with an MLflow and a null implementation (non-zero ranks get the null one).

Tracking URI, in order: `mlflow.tracking_uri` in the config, $MLFLOW_TRACKING_URI, else
`sqlite:///<output.dir>/mlflow.db` with artifacts in `<output.dir>/mlartifacts` (MLflow 3's plain file store refuses
to run). An http(s) server that does not answer /health fails BEFORE training starts.

Patient data never goes here: params are the resolved config (no EHR, no report text), metrics are numbers.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from datasets_io.config import Config
from datasets_io.errors import LauncherError


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifacts(self, local_dir: str, artifact_path: str) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    run_id = None

    def log_params(self, params): ...
    def log_metrics(self, metrics, step): ...
    def set_tags(self, tags): ...
    def log_artifacts(self, local_dir, artifact_path): ...
    def close(self, status="FINISHED"): ...


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if not isinstance(v, list) else ",".join(map(str, v))
    return out


def resolve_tracking_uri(cfg: Config) -> str:
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.output.dir).resolve()}/mlflow.db"


def artifact_location(cfg: Config) -> str | None:
    """Local artifact dir for a sqlite store (None for servers: they own their artifact store)."""
    uri = resolve_tracking_uri(cfg)
    if uri.startswith("sqlite:"):
        return (Path(cfg.output.dir).resolve() / "mlartifacts").as_uri()
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status != 200:
                raise OSError(f"HTTP {r.status}")
    except (OSError, urllib.error.URLError) as e:
        raise LauncherError(
            f"MLflow tracking server {uri} is not reachable ({e}). Start it, fix mlflow.tracking_uri / "
            "MLFLOW_TRACKING_URI, or unset both to use the local sqlite store."
        ) from None


class MlflowTracker:
    def __init__(self, cfg: Config, run_id: str | None = None, run_name: str | None = None):
        import mlflow

        self.mlflow = mlflow
        uri = resolve_tracking_uri(cfg)
        check_reachable(uri)
        if uri.startswith("sqlite:"):
            Path(cfg.output.dir).mkdir(parents=True, exist_ok=True)
        # An explicit client, never mlflow.set_tracking_uri: that also exports MLFLOW_TRACKING_URI, and the next run
        # in this process would silently log into this run's store.
        self.client = mlflow.MlflowClient(uri)
        exp = self.client.get_experiment_by_name(cfg.mlflow.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            cfg.mlflow.experiment, artifact_location=artifact_location(cfg))
        if run_id is None:
            run = self.client.create_run(exp_id, run_name=run_name or cfg.mlflow.run_name or None)
            run_id = run.info.run_id
        self.run_id = run_id
        self.tracking_uri = uri

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class ResumeSafeTracker:
    """A resumed run's tracker: the loop replays the steps between the checkpoint and the stop, and MLflow already
    has their metrics, so a metric is written only at steps beyond the last one logged for its key (both runtimes).
    `echo` (Ray: job logs) also gets every metric dict; `close_run=False` leaves the run's status to its owner (the
    Ray driver)."""

    def __init__(self, inner: Any, echo: Any = None, close_run: bool = True):
        self.inner, self.run_id, self.echo, self.close_run = inner, inner.run_id, echo, close_run
        self.tracking_uri = getattr(inner, "tracking_uri", None)
        client = inner.client
        self.last_step = {key: max((m.step for m in client.get_metric_history(self.run_id, key)), default=-1)
                          for key in client.get_run(self.run_id).data.metrics}

    def log_params(self, params: dict) -> None:
        self.inner.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.last_step.get(k, -1)}
        if fresh:
            self.inner.log_metrics(fresh, step=step)
            for k in fresh:
                self.last_step[k] = step
        if self.echo is not None:
            self.echo(metrics, step)

    def set_tags(self, tags: dict) -> None:
        self.inner.set_tags(tags)

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        self.inner.log_artifacts(local_dir, artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        if self.close_run:
            self.inner.close(status)


def config_params(cfg: Config) -> dict[str, Any]:
    return flatten(cfg.model_dump())
