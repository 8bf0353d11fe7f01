"""The Ray path: driver-side pieces (fast), then end to end on real Ray clusters on 127.0.0.1 (slow): 2 DeepSpeed
workers under ZeRO-3, and `ray job submit` against a `ray start` head.

    python -m pytest tests/test_ray_train.py -q        (a few minutes on 2 cores)

A worker killed mid-Stage B, the planned data order and the local/Ray loss equality are in
tests/test_one_data_path.py. One local Ray instance serves the in-process runs (shared with the other Ray tests).
The job-submission
test, last, first shuts that one down, starts its own head with `ray start --block` in a dedicated temp dir and free
ports, and stops exactly that head by sending SIGTERM to its `ray start` process (never `ray stop`, which stops
every Ray process on the machine).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, running_ray_head, tiny_overrides

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    """100 studies: enough validation rows for one micro-batch per rank per stage."""
    from datasets_io.synth import write_synthetic

    out = tmp_path_factory.mktemp("ray_train_data")
    write_synthetic(out, 100, seed=1, image_size=(128, 128), progress=False)
    return out


def ray_cfg(data: Path, out: Path, **extra):
    from datasets_io.config import load_config

    sets = {
        "ray.num_workers": 2,
        "ray.cpus_per_worker": 0.5,
        "ray.name": out.name,
        "ray.max_failures": 1,
        "curriculum.ehr_dropout": 0.25,
        **extra,
    }
    return load_config(REPO / "configs" / "tiny.yaml", tiny_overrides(data, out, **sets))


class LogitsProbe:
    """Step hook: after optimizer step `step` every rank runs the live model on its first Stage B validation batch
    (a collective forward under ZeRO-3); rank 0 saves that batch's inputs and the logits to `path`."""

    def __init__(self, step: int, path: str):
        self.step, self.path = step, path

    def __call__(self, step: int, stage: str, state, io) -> None:
        if step != self.step:
            return
        import torch
        from safetensors.torch import save_file

        batch = {k: v for k, v in io.val_source("B")[0].items() if isinstance(v, torch.Tensor)}  # packed by default
        logits = io.engine.logits(batch)
        if io.rank == 0:
            save_file({"logits": logits.contiguous(), **{k: v.contiguous() for k, v in batch.items()}}, self.path)


def rank_reports(out: Path) -> list[dict]:
    return [json.loads((out / "ray_ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]


def metric_history(summary: dict, key: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    return sorted(client.get_metric_history(summary["mlflow_run_id"], key), key=lambda m: (m.step, m.timestamp))


def decreasing(losses: list[float]) -> bool:
    return losses[-1] < losses[0] and sum(losses[-3:]) < sum(losses[:3])


# ------------------------------------------------------------------------------------------------ driver side
def test_config_is_resolved_for_the_cluster(train_data, tmp_path, monkeypatch):
    from datasets_io.config import ConfigError
    from launcher.ray_train import check_supported, resolve_for_cluster

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = ray_cfg(train_data, Path("rel/out"))
    r = resolve_for_cluster(cfg, num_workers=3, use_gpu=False)
    assert r.ray.num_workers == 3 and r.output.dir == str(tmp_path / "rel" / "out")
    assert r.ray.storage_path == str(tmp_path / "rel" / "out" / "ray")  # absolute: Ray requires it
    assert r.mlflow.tracking_uri == f"sqlite:///{tmp_path}/rel/out/mlflow.db"  # the same file from every worker
    assert cfg.ray.num_workers == 2  # the original is untouched
    check_supported(ray_cfg(train_data, tmp_path / "x", **{"curriculum.replay_fraction": 0.2}))  # replay works on Ray
    with pytest.raises(ConfigError, match="global_batch_size: 12 is not a multiple of .* 4 x 2 = 8"):
        check_supported(ray_cfg(train_data, tmp_path / "x", **{"train.global_batch_size": 12}))


def test_the_driver_leaves_the_tiny_weights_to_rank_0_and_they_are_the_local_builds(train_data, tmp_path):
    """The Ray driver writes the tiny base's tokenizer + config only (no modeling imports on its critical path);
    the weights rank 0 draws from that config and the Stage A rows, its vision tower pre-trained
    (training/vision_pretrain.py), are the ones the local runtime's one-go build writes, bit for bit, although the
    two processes run torch on different thread counts."""
    import torch
    from safetensors.torch import load_file

    from datasets_io.sampler import row_table
    from launcher.local import corpus_texts, load_run_data
    from training.model import WEIGHTS_FILE, ensure_tiny_weights, resolve_base_path

    pretrain = {"model.tiny.vision_pretrain_steps": 3}
    cfg = ray_cfg(train_data, tmp_path / "driver", **pretrain)
    data = load_run_data(cfg)
    texts, stage_a = corpus_texts(data), row_table(data.train["A"])
    base = Path(resolve_base_path(cfg, texts, weights=False))
    assert (base / "config.json").is_file() and (base / "tokenizer.json").is_file()
    assert not (base / WEIGHTS_FILE).exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # rank 0 of a 0.5-CPU worker
    try:
        ensure_tiny_weights(base, cfg, stage_a)  # what rank 0 does before anyone loads the model
    finally:
        torch.set_num_threads(threads)
    local = Path(resolve_base_path(ray_cfg(train_data, tmp_path / "local", **pretrain), texts, stage_a=stage_a))
    drawn, built = load_file(base / WEIGHTS_FILE), load_file(local / WEIGHTS_FILE)
    assert drawn.keys() == built.keys() and len(drawn) > 50
    assert all(torch.equal(drawn[k], built[k]) for k in drawn)
    assert sorted(p.name for p in base.iterdir()) == sorted(p.name for p in local.iterdir())  # no temp dir left
    # the tower was trained (not the random draw), the rest is the random draw: both comparisons above can fail
    random = load_file(Path(resolve_base_path(ray_cfg(train_data, tmp_path / "random"), texts)) / WEIGHTS_FILE)
    tower = [k for k in built if k.startswith("vision_tower.")]
    assert tower and all(not torch.equal(built[k], random[k]) for k in tower if k.endswith("fc1.weight"))
    assert all(torch.equal(built[k], random[k]) for k in built if k.startswith("multi_modal_projector."))
    with pytest.raises(Exception, match="needs Stage A training rows"):
        resolve_base_path(ray_cfg(train_data, tmp_path / "norows", **pretrain), texts)


def test_validation_rows_are_equal_whole_batches_per_rank(train_data, tmp_path):
    from launcher.local import load_run_data
    from training.recipe import validation_slice

    cfg = ray_cfg(train_data, tmp_path / "v", **{"train.val_batches": 5})
    data = load_run_data(cfg)
    split = {s: [validation_slice(data.val[s], cfg.train.micro_batch_size, 5, r, 2) for r in (0, 1)] for s in "AB"}
    for stage in ("A", "B"):
        sizes = [len(rows) for rows in split[stage]]
        assert sizes[0] == sizes[1] and sizes[0] % cfg.train.micro_batch_size == 0 and sizes[0] > 0
        assert not {r.image for r in split[stage][0]} & {r.image for r in split[stage][1]}


def test_resume_on_another_worker_count_is_refused_with_the_reason(train_data, tmp_path):
    from datasets_io.errors import LauncherError
    from training.recipe import check_resumable
    from training.checkpoint import resume_key
    from training.curriculum import make_plan

    cfg = ray_cfg(train_data, tmp_path / "r")
    plan = make_plan(
        max_steps=10,
        epochs=1.0,
        n_rows_a=50,
        n_rows_b=50,
        micro_batch_size=4,
        grad_accum=1,
        world_size=2,
        stage_split=0.35,
        warmup_steps=2,
        min_lr_ratio=0.1,
    )
    key = resume_key(cfg, plan, 2, "abc")
    saved = {"resume_key": key, "world_size": 2, "cursor_unit": "global_positions"}
    where = f"run {cfg.ray.storage_path}/{cfg.ray.name}"
    on4 = {**key, "world_size": 4}
    check_resumable(saved, key, where)  # same plan, same workers: fine
    check_resumable(None, on4, where)  # nothing to resume
    with pytest.raises(LauncherError, match="saved by 2 workers, this run has 4: .*optimizer state is partitioned"):
        check_resumable(saved, on4, where)  # the same global batch on 4 workers: the plan matches, the state not
    with pytest.raises(LauncherError, match="counts micro-batches of one rank"):  # a checkpoint from before
        check_resumable({**saved, "cursor_unit": None}, key, where)
    with pytest.raises(LauncherError, match="the run's plan changed") as e:
        check_resumable(saved, {**key, "total_steps": 11}, where)
    assert "total_steps: checkpoint 10, now 11" in str(e.value)


def test_submit_builds_the_entrypoint_and_runtime_env(tmp_path):
    import shlex

    from launcher.cli import build_parser
    from launcher.submit import build_entrypoint, build_runtime_env

    entry = build_entrypoint(["train.max_steps=5", "mlflow.run_name=a b"], num_workers=4, use_gpu=True)
    assert shlex.split(entry) == [
        "python",
        "-m",
        "launcher.cli",
        "ray",
        "--config",
        "env:LAUNCHER_CONFIG_YAML",
        "--num-workers",
        "4",
        "--use-gpu",
        "--set",
        "train.max_steps=5",
        "--set",
        "mlflow.run_name=a b",
    ]
    env = build_runtime_env("train:\n  max_steps: 5\n", str(tmp_path), str(REPO / "cluster" / "runtime_env.yaml"))
    assert env["working_dir"] == str(tmp_path) and env["env_vars"]["LAUNCHER_CONFIG_YAML"].startswith("train:")
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and ".venv/" in env["excludes"]
    args = build_parser().parse_args(shlex.split(entry)[3:])  # what the job runs parses
    assert args.command == "ray" and args.num_workers == 4 and args.use_gpu is True


def test_cluster_config_passes_rays_schema():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(cluster))  # what `ray up` checks first
    assert {"head", "gpu_worker"} <= set(cluster["available_node_types"])
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert runtime_env["working_dir"] == "." and "env_vars" in runtime_env


# ------------------------------------------------------------------------------------------------ ZeRO-3
@pytest.mark.slow
def test_zero3_two_workers_stage_switch_and_a_plain_peft_bundle(ray_local, train_data, tmp_path, test_hooks):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from launcher.ray_train import run_ray
    from training.model import load_base
    from training.packing import model_layout

    out = tmp_path / "z3"
    cfg = ray_cfg(
        train_data,
        out,
        **{"deepspeed.zero_stage": 3, "deepspeed.stage3_param_persistence_threshold": 0, "train.max_steps": 8},
    )
    test_hooks[0].append(LogitsProbe(7, str(tmp_path / "probe.safetensors")))  # after the last of 8 steps
    summary = run_ray(cfg)

    assert summary["global_step"] == summary["total_steps"] == 8 and len(summary["losses"]) == 8
    assert decreasing(summary["losses"]), summary["losses"]
    stage_a = 3  # round(0.35 * 8)
    for r in rank_reports(out):  # both ranks switched at the same step, and drew the same number of batches
        assert r["stage_switch_step"] == stage_a and r["first_step_of_stage"] == {"A": 0, "B": stage_a}, r
        assert r["cursor"] == {"A": stage_a * 8, "B": (8 - stage_a) * 8} and r["resumed_from"] is None  # positions
    assert [m.step for m in metric_history(summary, "val/loss_B")] == [stage_a, 8]  # validation ran (collective)

    # the reported checkpoint (Ray storage) is a complete bundle: PEFT files + every rank's ZeRO-3 partitions
    ckpt = Path(summary["ray_checkpoint"])
    assert ckpt.name == "final" and ckpt.parent == Path(cfg.output.dir).resolve() / "ray" / cfg.ray.name
    names = {p.name for p in ckpt.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_state.json",
        "config.yaml",
        "tokenizer.json",
        "engine",
    } <= names
    engine_files = {p.name for p in (ckpt / "engine").iterdir()}
    partitions = {f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")}
    assert partitions <= engine_files

    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())  # gathered: never Size([0])
    assert any(".lora_A." in k for k in adapter) and any("multi_modal_projector" in k for k in adapter)

    # plain PEFT on the plain base model gives the logits the live (ZeRO-3 partitioned) model gave, with the run's
    # attention backend (the tiny config's packed_sdpa: the probe's batch is one padding-free row)
    base, _ = load_base(summary["base_model"], torch.float32, cfg.model.attn_implementation)
    model = PeftModel.from_pretrained(base, str(ckpt)).eval()
    probe = load_file(str(tmp_path / "probe.safetensors"))
    assert "position_ids" in probe and "attention_mask" not in probe  # a packed batch (the default layout)
    with torch.no_grad():
        logits = model(**model_layout(model, {k: v for k, v in probe.items() if k != "logits"})[0]).logits
    assert logits.shape == probe["logits"].shape
    torch.testing.assert_close(logits, probe["logits"], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ ray job submit
@pytest.mark.slow
def test_ray_job_submit_against_a_started_head(train_data, tmp_path):
    """`ray start --head --node-ip-address 127.0.0.1` + `ray job submit -- launcher ray ...`, then stop THAT head."""
    out = tmp_path / "job"
    with running_ray_head("rj", num_cpus=4, object_store_mb=400) as (env, ports):
        overrides = tiny_overrides(
            train_data,
            out,
            **{"train.max_steps": 2, "ray.num_workers": 1, "ray.cpus_per_worker": 1.0, "ray.name": "job"},
        )
        cmd = [
            str(VENV_BIN / "ray"),
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{ports['dashboard']}",
            "--",
            "launcher",
            "ray",
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
        ]
        for item in overrides:
            cmd += ["--set", item]
        job = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=420)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    assert "[done] 2/2 steps on 1 workers" in job.stdout and "succeeded" in job.stdout.lower()
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["runtime"] == "ray"


@pytest.mark.slow
def test_bad_record_fails_the_run_and_stops_the_cluster_it_started(train_data, tmp_path, monkeypatch):
    """Without RAY_ADDRESS, `launcher ray` starts a local cluster while a thread checks the data: a bad record fails
    the run with its file, line and field, no MLflow run is left behind, and the cluster started for it is gone."""
    import ray

    from datasets_io.records import RecordError
    from launcher.ray_train import run_ray

    if ray.is_initialized():  # the run must start its own cluster
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    data = tmp_path / "data"
    shutil.copytree(train_data, data)
    train = data / "curriculum_train.jsonl"
    lines = train.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["stage"] = "C"
    lines[2] = json.dumps(bad)
    train.write_text("\n".join(lines) + "\n")
    cfg = ray_cfg(data, tmp_path / "bad", **{"ray.num_workers": 1, "ray.cpus_per_worker": 1.0})

    with pytest.raises(RecordError) as e:
        run_ray(cfg)
    assert e.value.where == f"{train}:3" and e.value.field == "stage"
    assert not ray.is_initialized()
    out = tmp_path / "bad"
    assert not (out / "ray" / out.name / "launcher_run.json").exists()  # no MLflow run was pinned to the Ray run
    assert not list(out.glob("**/mlflow.db"))
