"""THE MLflow module: every run, param, metric, tag, artifact and model-registry call of the project goes through
here, on public MLflow APIs only (`mlflow`, `mlflow.MlflowClient`). No other module imports mlflow, except the served
model (training/pyfunc.py), which subclasses mlflow.pyfunc.PythonModel; import-linter checks both.

- **The store**: `mlflow.tracking_uri` in the config, $MLFLOW_TRACKING_URI, else `sqlite:///<output.dir>/mlflow.db`,
  with artifacts in `mlartifacts/` next to a sqlite db (MLflow 3's plain file store refuses to run). An http(s)
  server that does not answer /health fails BEFORE any work.
- **Runs**: the Tracker Protocol the training loop logs to, with an MLflow and a null implementation (non-zero ranks
  get the null one); ResumeSafeTracker (a resumed run never logs a step twice); `log_run` (a one-shot run: an
  evaluation).
- **The model registry**: `log_registered_model` (a pyfunc model logged into a run, registered as a version, an
  alias pointed at it; training/registry.py decides what goes in it) and `load_pyfunc_model`.

Patient data never goes here: params are the resolved config and settings (no EHR, no report text), metrics are
numbers, tags are paths, hashes and ids.
"""

from __future__ import annotations

import functools
import os
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Protocol, Sequence

from datasets_io.config import Config
from datasets_io.errors import LauncherError

# MLflow's limits: a param value's length, a key's length, and what one log_batch call may hold.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


# --------------------------------------------------------------------------------------------- the store
def resolve_tracking_uri(cfg: Config) -> str:
    """The store a run config points at: mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else the run's sqlite db."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.output.dir).resolve()}/mlflow.db"


def resolve_store(tracking_uri: str | None = None, cfg: Config | None = None) -> str:
    """The store to open, checked: `tracking_uri` (--tracking-uri), else the config's (resolve_tracking_uri), else
    $MLFLOW_TRACKING_URI. A server must answer /health; a sqlite db's directory is created."""
    uri = tracking_uri or (resolve_tracking_uri(cfg) if cfg is not None else os.environ.get("MLFLOW_TRACKING_URI"))
    if not uri:
        raise LauncherError("no MLflow tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    check_reachable(uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store live in `mlartifacts/` next to the db; a server owns its artifact store (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()


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


def _client(uri: str) -> Any:
    """An explicit client, never mlflow.set_tracking_uri: that also exports MLFLOW_TRACKING_URI, and the next run in
    this process would silently log into this store."""
    import mlflow

    return mlflow.MlflowClient(uri, registry_uri=uri)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


def mlflow_version() -> str:
    import mlflow

    return mlflow.__version__


def registered_model_count(uri: str, limit: int = 100) -> int:
    """How many registered models the store lists (at most `limit`); raises what the registry raises."""
    return len(_client(uri).search_registered_models(max_results=limit))


# --------------------------------------------------------------------------------------------- runs
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


class MlflowTracker:
    """One MLflow run: a new one in `experiment` (created when missing), or the existing `run_id`."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        *,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
    ):
        self.tracking_uri, self.run_id = uri, run_id
        if run_id is None:
            exp_id = _experiment_id(self.client, experiment, uri)
            self.run_id = self.client.create_run(exp_id, run_name=run_name or None, tags=tags).info.run_id
        elif tags:
            self.set_tags(tags)

    @functools.cached_property
    def client(self) -> Any:
        """Opened at first use (a store open costs ~1 s of CPU on 2 cores): a Ray rank's tracker for the driver's
        run first touches the store when it logs its first step, not before the step is computed."""
        return _client(self.tracking_uri)

    @classmethod
    def from_config(cls, cfg: Config, run_id: str | None = None, run_name: str | None = None) -> "MlflowTracker":
        """A training run: the config's store and experiment; a new run named run_name / mlflow.run_name, or the
        resumed `run_id`."""
        return cls(
            resolve_store(None, cfg),
            cfg.mlflow.experiment,
            run_id=run_id,
            run_name=run_name or cfg.mlflow.run_name or None,
        )

    def log_params(self, params: dict[str, Any]) -> None:
        """Params the run does not have yet (MLflow refuses to change one: a resumed run keeps its first values)."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k[:MAX_KEY], str(v)[:MAX_PARAM_VALUE]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k[:MAX_KEY], float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(batch), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i : i + METRICS_PER_BATCH])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def log_artifact(self, local_file: str, artifact_path: str) -> None:
        self.client.log_artifact(self.run_id, local_file, artifact_path)

    def last_logged_steps(self) -> dict[str, int]:
        """Metric key -> the last step the run has for it."""
        return {
            key: max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
            for key in self.client.get_run(self.run_id).data.metrics
        }

    def reopen(self) -> None:
        """Mark a run that an earlier launch ended as RUNNING again (a relaunched Ray run)."""
        self.client.update_run(self.run_id, status="RUNNING")

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class ResumeSafeTracker:
    """A resumed run's tracker: the loop replays the steps between the checkpoint and the stop, and MLflow already
    has their metrics, so a metric is written only at steps beyond the last one logged for its key (both runtimes).
    `echo` (Ray: job logs) also gets every metric dict; `close_run=False` leaves the run's status to its owner (the
    Ray driver)."""

    def __init__(self, inner: MlflowTracker, echo: Any = None, close_run: bool = True):
        self.inner, self.run_id, self.echo, self.close_run = inner, inner.run_id, echo, close_run
        self.tracking_uri = inner.tracking_uri
        self._last_step: dict[str, int] | None = None  # read at first use, like the store (MlflowTracker.client)

    @property
    def last_step(self) -> dict[str, int]:
        if self._last_step is None:
            self._last_step = self.inner.last_logged_steps()
        return self._last_step

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


def log_run(
    uri: str,
    experiment: str,
    run_name: str,
    *,
    tags: dict[str, str],
    params: dict[str, Any],
    metrics: dict[str, float],
    files: Sequence[tuple[Path, str]],
) -> str:
    """A one-shot run (an evaluation): tags, params, metrics at step 0, each (file, artifact folder) of `files`.
    The run ends FINISHED, or FAILED when a write fails. Returns its id."""
    tracker = MlflowTracker(uri, experiment, run_name=run_name, tags=tags)
    status = "FAILED"
    try:
        tracker.log_params(params)
        tracker.log_metrics(metrics, step=0)
        for path, artifact_path in files:
            tracker.log_artifact(str(path), artifact_path)
        status = "FINISHED"
    finally:
        tracker.close(status)
    return tracker.run_id


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if not isinstance(v, list) else ",".join(map(str, v))
    return out


def config_params(cfg: Config) -> dict[str, Any]:
    return flatten(cfg.model_dump())


# --------------------------------------------------------------------------------------------- the model registry
class TrackingTarget:
    """Point the mlflow fluent API (start_run, pyfunc.log_model, register_model, pyfunc.load_model: MLflow 3.17 gives
    them no URI argument) at `uri` for a block, then put the previous target back, with public APIs only.

    mlflow.set_tracking_uri / set_registry_uri keep the global URIs and MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI in
    step (setting one exports the other), so the environment carries the previous target: on exit the globals are
    unset (None) and the variables restored, and the next run in this process resolves its store as before."""

    _ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")

    def __init__(self, uri: str):
        self.uri = uri

    def __enter__(self) -> None:
        import mlflow

        self.prev_env = {k: os.environ.get(k) for k in self._ENV}
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)

    def __exit__(self, *exc: Any) -> None:
        import mlflow

        mlflow.set_tracking_uri(None)  # None = unset (it also drops MLFLOW_TRACKING_URI, restored below)
        mlflow.set_registry_uri(None)
        for k, v in self.prev_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _finished_run(client: Any, run_id: str | None) -> str | None:
    """`run_id` when it is in this store and over: a model is logged into it (resuming it briefly). A RUNNING run is
    left alone (training may still be writing to it; ending it would mark it FINISHED)."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 -- MlflowException(RESOURCE_DOES_NOT_EXIST) on another store
        return None
    return run_id if run.info.status != "RUNNING" else None


def log_registered_model(
    uri: str,
    experiment: str,
    name: str,
    pyfunc_model: dict[str, Any],
    *,
    alias: str | None,
    run_id: str | None,
    new_run_name: str,
    new_run_tags: dict[str, str],
    version_tags: dict[str, str],
) -> dict[str, str]:
    """Log a pyfunc model (`pyfunc_model`: mlflow.pyfunc.log_model's keyword arguments) into the run `run_id` when it
    is in this store and over (an MLflow 3 LoggedModel of that run), else into a new run of `experiment` named
    `new_run_name` and tagged `new_run_tags`; register it as a version of `name` tagged `version_tags`; point `alias`
    at it.

    Returns {version, logged_model_uri, run_id}."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    client = _client(uri)
    run_id = _finished_run(client, run_id)
    run_kwargs = (
        {"run_id": run_id}
        if run_id
        else {"experiment_id": _experiment_id(client, experiment, uri), "run_name": new_run_name}
    )
    with TrackingTarget(uri), mlflow.start_run(**run_kwargs) as run:
        if not run_id:
            mlflow.set_tags(new_run_tags)
        with warnings.catch_warnings():
            # An input example would make MLflow run the model at log time; the signature says enough.
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            info = mlflow.pyfunc.log_model(**pyfunc_model)
        version = mlflow.register_model(info.model_uri, name, tags=version_tags)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return {"version": str(version.version), "logged_model_uri": info.model_uri, "run_id": run.info.run_id}


def load_pyfunc_model(model_uri: str, uri: str) -> Any:
    """mlflow.pyfunc.load_model(model_uri) from the store `uri` (the serving path); a failure is a LauncherError
    saying what and where."""
    import mlflow

    # Not mlflow.artifacts.download_artifacts(registry_uri=uri): 3.17 resolves a models:/NAME@ALIAS URI through the
    # global registry URI whatever it is given (ModelsArtifactRepository._get_model_uri_infos).
    with TrackingTarget(uri):
        try:
            return mlflow.pyfunc.load_model(model_uri)
        except Exception as e:  # noqa: BLE001 -- MlflowException / OSError: say what and where
            raise LauncherError(
                f"cannot load {model_uri} from {uri}: {e.__class__.__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}"
            ) from None


def pyfunc_predict(model: Any, frame: Any, params: dict[str, Any], what: str) -> Any:
    """model.predict(frame, params); the model refusing a request (an MlflowException: training.pyfunc's serving
    limits) is a LauncherError naming `what` (the user's inputs)."""
    from mlflow.exceptions import MlflowException

    try:
        return model.predict(frame, params=params)
    except MlflowException as e:
        raise LauncherError(f"{what}: {e.message}") from None
