"""`launcher doctor`: is this machine ready to train, track and serve? One table, one line per check.

    launcher doctor                                   (the machine: Python, torch devices, Ray, DeepSpeed, MLflow, disk)
    launcher doctor --config configs/tiny.yaml        (also: the config's data, base model, tracking URI, output disk)
    RAY_ADDRESS=10.0.0.5:6379 launcher doctor         (also: the cluster there, its nodes and resources)

Each line is `ok`, `warn` (works, but read the note), `fail` or `skip` (nothing to check without --config). The
command exits 1 when a line fails and then lists the failing lines, each with what to do; 0 otherwise. Nothing is
written: a sqlite tracking store that does not exist yet is reported, not created.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

SAMPLE_RECORDS = 32  # per curriculum file: a quick look (schema + image decode), not `launcher data validate`
DEFAULT_MIN_FREE_GB = 2.0


@dataclass
class Check:
    """One line of the table. `fix` says what to do; it is printed for failing and warning lines."""

    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="check this machine: devices, Ray, DeepSpeed, MLflow, data, base model, disk",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, metavar="FILE", help="run config whose data, model and tracking to check")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides (repeatable)")
    p.add_argument(
        "--min-free-gb",
        type=float,
        default=DEFAULT_MIN_FREE_GB,
        help="free disk below this under output.dir fails (default: %(default)s GB)",
    )
    p.set_defaults(func=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    from datasets_io.config import load_config

    cfg = load_config(args.config, args.set)  # defaults when no --config: their tracking URI and output dir
    has_cfg = bool(args.config)
    checks = [
        _guarded("python", check_python),
        _guarded("torch", lambda: check_torch(cfg.model.dtype)),
        _guarded("ray", lambda: check_ray(os.environ.get("RAY_ADDRESS", ""))),
        _guarded("deepspeed", lambda: check_deepspeed(cfg.deepspeed.offload_optimizer)),
        _guarded("mlflow", lambda: check_mlflow(cfg)),
        *(check_data(cfg) if has_cfg else [Check("data", "skip", "no --config: no curriculum to check")]),
        _guarded("base model", lambda: check_base_model(cfg.model.name_or_path, cfg.output.dir))
        if has_cfg
        else Check("base model", "skip", "no --config: no model.name_or_path to check"),
        _guarded("disk", lambda: check_disk(cfg.output.dir, args.min_free_gb)),
    ]
    print(format_table(checks))
    failing = [c for c in checks if c.status == "fail"]
    for c in checks:
        if c.status == "warn" and c.fix:
            print(f"note {c.name}: {c.fix}")
    if failing:
        print(f"\n{len(failing)} failing:", ", ".join(c.name for c in failing))
        for c in failing:
            print(f"  {c.name}: {c.detail}\n    -> {c.fix}")
        return 1
    return 0


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'CHECK':{width}}  STATUS  DETAIL"]
    lines += [f"{c.name:{width}}  {c.status:6}  {c.detail}" for c in checks]
    return "\n".join(lines)


def _guarded(name: str, fn: Callable[[], Check]) -> Check:
    """A check that crashes is a failing line that says so, never a traceback that hides the other lines."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- any failure of a probe is a finding, reported on its line
        return Check(
            name,
            "fail",
            f"the check itself failed: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}",
            'fix the installation of this component (see README "Stack") and run doctor again',
        )


# --------------------------------------------------------------------------------------------- machine
def check_python() -> Check:
    v = sys.version_info
    detail = f"{platform.python_version()} ({sys.executable})"
    if (v.major, v.minor) != (3, 11):
        return Check("python", "fail", detail, "use Python 3.11 (pyproject requires >=3.11,<3.12)")
    return Check("python", "ok", detail)


def check_torch(model_dtype: str) -> Check:
    import torch

    parts = [torch.__version__]
    cuda = torch.cuda.is_available()
    if cuda:
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        parts.append(
            f"cuda x{torch.cuda.device_count()} ({', '.join(names)}), bf16 "
            f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}"
        )
    else:
        parts.append("cuda no")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    parts.append(f"mps {'yes' if mps else 'no'}")
    parts.append(f"cpu {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    detail = "; ".join(parts)
    if model_dtype in ("bf16", "fp16") and not (cuda or mps):
        return Check(
            "torch",
            "fail",
            detail + f"; config model.dtype={model_dtype}",
            f"model.dtype={model_dtype} needs a GPU here: set model.dtype=auto (fp32 on CPU) or run on a GPU",
        )
    if cuda and model_dtype == "bf16" and not torch.cuda.is_bf16_supported():
        return Check(
            "torch", "fail", detail + "; config model.dtype=bf16", "this GPU has no bf16: set model.dtype=fp16 or fp32"
        )
    return Check("torch", "ok", detail)


def check_ray(address: str) -> Check:
    import ray

    if not address:
        return Check("ray", "ok", f"{ray.__version__}; RAY_ADDRESS not set: `launcher ray` starts a local cluster")
    if address.startswith(("http://", "https://")):
        return _check_ray_dashboard(address, ray.__version__)
    return _check_ray_cluster(address, ray)


def _check_ray_dashboard(address: str, local_version: str) -> Check:
    """A job-submission address (the dashboard): it answers /api/version with the cluster's Ray version."""
    import json

    try:
        with urllib.request.urlopen(address.rstrip("/") + "/api/version", timeout=5) as r:
            remote = json.loads(r.read()).get("ray_version", "?")
    except (OSError, ValueError) as e:
        return Check(
            "ray",
            "fail",
            f"{local_version}; RAY_ADDRESS={address} does not answer ({e})",
            "start the head (`ray start --head`), fix RAY_ADDRESS, or unset it to run locally",
        )
    if remote != local_version:
        return Check(
            "ray",
            "fail",
            f"{local_version}; cluster at {address} runs Ray {remote}",
            f"install ray=={remote} here or the pinned ray=={local_version} on the cluster",
        )
    return Check(
        "ray",
        "ok",
        f"{local_version}; dashboard {address} answers (Ray {remote}); resources: `ray status --address` on the head",
    )


def _check_ray_cluster(address: str, ray: Any) -> Check:
    """Connect as a driver for a moment: the nodes and resources `launcher ray` would get. A TCP probe first:
    ray.init keeps retrying an address where nothing listens for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        if address != "auto":  # "auto": the cluster this machine is part of (ray.init finds it, or fails at once)
            socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        return Check(
            "ray",
            "fail",
            f"{ray.__version__}; nothing answers at RAY_ADDRESS={address} ({e})",
            "start the head (`ray start --head`), fix RAY_ADDRESS (HOST:6379), or unset it to run locally",
        )
    kwargs = {"_node_ip_address": "127.0.0.1"} if host in ("127.0.0.1", "localhost") else {}
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False, **kwargs)
    except Exception as e:  # noqa: BLE001 -- ConnectionError, version mismatch (RuntimeError), auth errors
        return Check(
            "ray",
            "fail",
            f"{ray.__version__}; cannot join RAY_ADDRESS={address}: "
            f"{e.__class__.__name__}: {str(e).splitlines()[0][:160]}",
            "start the head (`ray start --head`), fix RAY_ADDRESS, or unset it to run locally",
        )
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        res = ray.cluster_resources()
    finally:
        ray.shutdown()
    shown = f"CPU {res.get('CPU', 0):g}, GPU {res.get('GPU', 0):g}, memory {res.get('memory', 0) / 1e9:.1f} GB"
    gpus = res.get("GPU", 0)
    return Check(
        "ray",
        "ok",
        f"{ray.__version__}; cluster {address}: {len(alive)} node(s), {shown}"
        + ("" if gpus else " (no GPUs: ray.use_gpu must stay false)"),
    )


def check_deepspeed(offload_optimizer: bool) -> Check:
    """Ops DeepSpeed would JIT-compile on first use (compatible here, not prebuilt). The engine disables
    shm_comm on CPU and passes a torch optimizer, so only an offloaded optimizer (cpu_adam, compiled on first use) is built."""
    import importlib

    import deepspeed
    from deepspeed.git_version_info import installed_ops

    compatible = importlib.import_module("deepspeed.ops").__compatible_ops__
    jit = sorted(n for n, ok in compatible.items() if ok and not installed_ops.get(n))
    detail = (
        f"{deepspeed.__version__}; JIT on first use: {', '.join(jit) or 'none'} (the launcher's engine needs "
        "none of them unless deepspeed.offload_optimizer)"
    )
    if jit and not shutil.which("ninja"):
        return Check(
            "deepspeed", "fail", detail + "; no ninja on PATH", "pip install ninja (DeepSpeed builds its ops with it)"
        )
    if offload_optimizer and "cpu_adam" in jit:
        return Check(
            "deepspeed",
            "warn",
            detail,
            "deepspeed.offload_optimizer=true builds cpu_adam at the first step (~2 min per machine); "
            "prebuild with DS_BUILD_CPU_ADAM=1 pip install deepspeed to skip it",
        )
    return Check("deepspeed", "ok", detail)


# --------------------------------------------------------------------------------------------- tracking
def check_mlflow(cfg: Any) -> Check:
    """The tracking URI the config resolves to: a server must answer /health and list registered models; a sqlite
    store's directory must be writable (the file is created on first use, not here)."""
    from datasets_io.errors import LauncherError
    from training.tracking import check_reachable, mlflow_version, registered_model_count, resolve_tracking_uri

    version, uri = mlflow_version(), resolve_tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():
            parent = _nearest_existing(db.parent)
            if not os.access(parent, os.W_OK):
                return Check(
                    "mlflow",
                    "fail",
                    f"{version}; {uri}: {parent} is not writable",
                    "point output.dir or mlflow.tracking_uri at a writable place",
                )
            return Check("mlflow", "ok", f"{version}; {uri} (created at the first run)")
    try:
        check_reachable(uri)
    except LauncherError as e:
        return Check("mlflow", "fail", f"{version}; tracking URI {uri} is not reachable", str(e).split(". ", 1)[-1])
    try:
        n = registered_model_count(uri, limit=100)
    except Exception as e:  # noqa: BLE001 -- MlflowException / RestException: the registry is what matters
        return Check(
            "mlflow",
            "fail",
            f"{version}; {uri} tracks but its model registry fails: {e.__class__.__name__}",
            "use a database-backed store (sqlite, postgres)",
        )
    return Check(
        "mlflow", "ok", f"{version}; {uri} reachable, registry: {n}{'+' if n == 100 else ''} registered model(s)"
    )


# --------------------------------------------------------------------------------------------- the config's inputs
def check_data(cfg: Any) -> list[Check]:
    """The data root and the first SAMPLE_RECORDS records of each curriculum file: schema and image decode."""
    from datasets_io.jsonl import path_exists
    from datasets_io.config import data_path

    files = {name: data_path(cfg, name) for name in ("train_file", "val_file")}
    missing = [p for p in files.values() if not path_exists(p)]
    if missing and cfg.data.synth_if_missing:
        return [
            Check(
                "data",
                "warn",
                f"{', '.join(missing)} missing; data.synth_if_missing=true",
                f"the first run writes {cfg.data.synth_studies} synthetic studies to {cfg.data.root}",
            )
        ]
    if missing:
        return [
            Check(
                "data",
                "fail",
                f"not found: {', '.join(missing)}",
                f"fix data.root / data.train_file / data.val_file, or build the data (`launcher data synth "
                f"--out {cfg.data.root}` or `launcher data build`)",
            )
        ]
    return [
        _guarded(f"data {name}", lambda p=path, n=name: _sample_file(n, p, cfg.data.root))
        for name, path in files.items()
    ]


def _sample_file(name: str, path: str, root: str) -> Check:
    from datasets_io.jsonl import ReadReport, iter_records

    report = ReadReport()
    seen = 0
    for _ in iter_records(path, root, policy="skip", check_images="decode", report=report):
        seen += 1
        if seen + report.skipped >= SAMPLE_RECORDS:
            break
    label = f"data {name}"
    if report.problems:
        return Check(
            label,
            "fail",
            f"{path}: {report.skipped} of the first {seen + report.skipped} records bad; first: {report.problems[0]}",
            f"`launcher data validate {path} --data-root {root}` lists every bad record",
        )
    if not seen:
        return Check(label, "fail", f"{path}: no records", "the curriculum file is empty: rebuild the data")
    return Check(label, "ok", f"{path}: first {seen} records valid, images decode")


def check_base_model(name_or_path: str, output_dir: str) -> Check:
    """A local HF LLaVA directory must be complete: config, every weight shard, tokenizer."""
    import json

    if not name_or_path:
        return Check("base model", "ok", f"tiny (built from config into {output_dir}/base_model at the first run)")
    d = Path(name_or_path)
    if not d.is_dir():
        if name_or_path.startswith(("/", ".", "~")):
            return Check(
                "base model",
                "fail",
                f"{name_or_path}: no such directory",
                "fix model.name_or_path (a converted model: `launcher model convert-llava-med`)",
            )
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        return Check(
            "base model",
            "fail" if offline else "warn",
            f"{name_or_path}: a hub id, not a local directory",
            "HF_HUB_OFFLINE=1 forbids the download: point model.name_or_path at a local copy"
            if offline
            else "the first run downloads it; workers on other machines each download it too",
        )
    problems = _missing_model_files(d)
    if problems:
        return Check(
            "base model",
            "fail",
            f"{d}: incomplete: {'; '.join(problems)}",
            "copy the missing files, or convert again (`launcher model convert-llava-med --out DIR`)",
        )
    model_type = json.loads((d / "config.json").read_text()).get("model_type")
    if model_type != "llava":
        return Check(
            "base model",
            "fail",
            f"{d}: model_type {model_type!r}, not 'llava'",
            "convert it first (`launcher model convert-llava-med`)",
        )
    return Check("base model", "ok", f"{d}: config, weights, tokenizer present")


def _missing_model_files(d: Path) -> list[str]:
    import json

    problems = []
    if not (d / "config.json").is_file():
        problems.append("no config.json")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        gone = [s for s in shards if not (d / s).is_file()]
        if gone:
            problems.append(f"{len(gone)} of {len(shards)} weight shards missing ({gone[0]}, ...)")
    elif not (d / "model.safetensors").is_file():
        problems.append("no model.safetensors (nor an index)")
    if not ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file()):
        problems.append("no tokenizer.json / tokenizer.model")
    return problems


def check_disk(output_dir: str, min_free_gb: float) -> Check:
    where = _nearest_existing(Path(output_dir).resolve())
    free = shutil.disk_usage(where).free / 1e9
    detail = f"{free:.1f} GB free at {where} (output.dir {output_dir})"
    if free < min_free_gb:
        return Check(
            "disk",
            "fail",
            detail,
            f"free space or point output.dir elsewhere (doctor wants "
            f">= {min_free_gb:g} GB: checkpoints, the base model copy, MLflow)",
        )
    return Check("disk", "ok", detail)


def _nearest_existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
