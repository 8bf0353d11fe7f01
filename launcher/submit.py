"""`launcher submit`: the Ray Jobs API wrapper around `launcher ray`.

    launcher submit --address http://HEAD:8265 --config configs/tiny.yaml --num-workers 2 \\
        --runtime-env cluster/runtime_env.yaml

What it does, in the order it does it: reads the config locally (so a bad key fails here, not on the cluster), ships
the working directory as the job's `working_dir` and the config's YAML text as an environment variable (so a config
outside the working directory travels too), submits `python -m launcher.cli ray --config env:LAUNCHER_CONFIG_YAML
...` as the entrypoint, then streams the job's logs until it ends and returns 0 only if it SUCCEEDED.
Equivalent by hand: `ray job submit --address ... --working-dir . -- python -m launcher.cli ray --config FILE`.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import tempfile
from pathlib import Path

import yaml

from datasets_io.errors import LauncherError


CONFIG_ENV = "LAUNCHER_CONFIG_YAML"  # `--config env:LAUNCHER_CONFIG_YAML`: the YAML text shipped by `launcher submit`


def load_cli_config(path: str, overrides: list[str]):
    from datasets_io.config import load_config
    from datasets_io.errors import LauncherError

    if not path.startswith("env:"):
        return load_config(path, overrides)
    name = path[4:]
    if name not in os.environ:
        raise LauncherError(f"--config {path}: ${name} is not set")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(os.environ[name])
    try:
        return load_config(f.name, overrides)
    finally:
        os.unlink(f.name)


def build_entrypoint(overrides: list[str], num_workers: int | None, use_gpu: bool | None) -> str:
    parts = ["python", "-m", "launcher.cli", "ray", "--config", f"env:{CONFIG_ENV}"]
    if num_workers is not None:
        parts += ["--num-workers", str(num_workers)]
    if use_gpu is not None:
        parts.append("--use-gpu" if use_gpu else "--no-use-gpu")
    for item in overrides:
        parts += ["--set", item]
    return " ".join(shlex.quote(p) for p in parts)


def build_runtime_env(config_text: str, working_dir: str, runtime_env_file: str | None) -> dict:
    env: dict = {}
    if runtime_env_file:
        loaded = yaml.safe_load(Path(runtime_env_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise LauncherError(f"--runtime-env {runtime_env_file}: expected a mapping")
        env.update(loaded)
    if not Path(working_dir).is_dir():
        raise LauncherError(f"--working-dir {working_dir}: not a directory")
    env["working_dir"] = str(Path(working_dir).resolve())
    env["env_vars"] = {**(env.get("env_vars") or {}), CONFIG_ENV: config_text}
    return env


def submit_job(
    *,
    address: str,
    config: str,
    overrides: list[str],
    num_workers: int | None,
    use_gpu: bool | None,
    working_dir: str = ".",
    runtime_env_file: str | None = None,
    wait: bool = True,
) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    load_cli_config(config, overrides)  # fail here on a bad config, before anything is shipped
    config_text = Path(config).read_text() if not config.startswith("env:") else os.environ[config[4:]]
    runtime_env = build_runtime_env(config_text, working_dir, runtime_env_file)
    entrypoint = build_entrypoint(overrides, num_workers, use_gpu)
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection/auth problems surface as assorted exception types
        raise LauncherError(
            f"cannot reach the Ray Jobs API at {address}: {e}. Is the head's dashboard up (ray start --head "
            "--dashboard-host ...)? For a cluster with token auth, export RAY_AUTH_MODE=token (cluster/README.md)."
        ) from None
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"[submit] job {job_id} on {address}: {entrypoint}", flush=True)
    if not wait:
        print(f"  follow it with: ray job logs --address {address} --follow {job_id}")
        return 0

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(stream())
    status = client.get_job_status(job_id)
    print(f"[submit] job {job_id}: {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
