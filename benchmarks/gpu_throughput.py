"""Training throughput on one GPU: samples/s, tokens/s and model FLOP utilization of an LLaVA of a named shape
(random weights, built from config: no download), through `launcher local` and, with flags, a 1-worker Ray ZeRO run.

    python benchmarks/gpu_throughput.py --shape 7b --steps 20 --batch 4                  # local path, bf16, sdpa
    python benchmarks/gpu_throughput.py --shape 7b --attn flash_attention_2 --grad-ckpt --liger   # --no-packing: padded
    python benchmarks/gpu_throughput.py --shape small --runtimes local ray-zero2 ray-zero3
    python benchmarks/gpu_throughput.py --shape tiny --device cpu --dtype fp32 --steps 4   # the CPU check (tests)

Shapes (vision tower + language model; the projector is LLaVA's 2-layer MLP):
- 7b: CLIP ViT-L/14-336 (24 layers, 1024 wide, 577 positions -> 576 image tokens) + Mistral-7B (32 layers, 4096
  wide, 32 heads / 8 KV heads, MLP 14336, vocab 32000): LLaVA-Med v1.5's shape; trains as configs/llava_med_7b.yaml
  (LoRA r=64 on the LM's projections, projector fully, towers and embeddings frozen);
- small: CLIP ViT-B/16-224 (12 x 768, 196 image tokens) + a 1.1B Mistral (22 x 2048, 16 / 4 heads, MLP 5632);
- tiny: configs/tiny.yaml's model (the CPU check).
Data: the project's synthetic Stage B curriculum (EHR dropout 0.15), `--seq` = data.max_seq_len.

Measured: the loop's per-step samples/s (MLflow `train/samples_per_s`, log_every=1), median over the steps after
the first two (warm-up, allocator, cuDNN autotune). Tokens/s = samples/s x the mean real tokens per sample of the
run's positions (image tokens included; padding never counted). MFU = model FLOP/s / `--peak-tflops` (H200/H100 dense
bf16: 989). Model FLOPs per sample (the work a LoRA step must do, recomputation under gradient checkpointing not
counted, as in PaLM's MFU):
    language model: (4 * N_lm_frozen + 6 * N_trainable) * s  +  6 * L * d * s^2    (s = real tokens of the sample;
                    forward 2N, input gradients 2N, weight gradients 2N only for trained weights; causal attention
                    QK^T and AV forward 2 * L * d * s^2, backward twice that)
    vision tower:   2 * N_vision * p + 4 * L_v * d_v * p^2    (frozen, forward only; p = its positions)
with N counting the weights of matrix multiplies (embeddings excluded), the LM head counted at the label positions
only (it runs there only: training.model.label_loss) and the projector (trained) at the image tokens.
Liger kernels (`--liger`, when `liger_kernel` is installed) patch Mistral's RMSNorm / RoPE / SwiGLU in this process:
the local path only (a Ray worker would have to patch itself).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    "7b": {
        "vision": dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        ),
        "text": dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
        ),
        "config": "llava_med_7b.yaml",
    },
    "small": {
        "vision": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
        ),
        "text": dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=16,
            num_key_value_heads=4,
            vocab_size=32000,
        ),
        "config": "llava_med_7b.yaml",
    },
    "tiny": {
        "config": "tiny.yaml",
        "sets": [
            "model.train_vision_tower=false",
            "model.train_token_embeddings=false",
            "model.tiny.vision_pretrain_steps=0",  # throughput only: a random tower will do
        ],
    },
}


def build_base(shape: str, cfg, texts: list[str], out: Path, device: str, dtype) -> Path:
    """Random-weight LLaVA of `shape` + the project's BPE tokenizer, saved as an HF directory the launcher loads."""
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    from datasets_io.images import CLIP_MEAN, CLIP_STD
    from datasets_io.records import IMAGE_TOKEN
    from training.model import build_tiny_base
    from training.tokenizer import train_tokenizer

    if shape == "tiny":
        return build_tiny_base(cfg, texts, out)
    s = SHAPES[shape]
    tok = train_tokenizer(texts, 4096)
    text = MistralConfig(
        **{**s["text"], "vocab_size": max(s["text"]["vocab_size"], len(tok))},
        max_position_embeddings=32768,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        sliding_window=None,
    )
    vision = CLIPVisionConfig(**s["vision"], num_channels=3, projection_dim=768)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the training dtype, on the device: seconds, not minutes, for 7B
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "image_spec.json").write_text(
        __import__("json").dumps({"size": vision.image_size, "mean": CLIP_MEAN, "std": CLIP_STD})
    )
    del model
    return out


def projection_dims(t) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer in one Mistral decoder layer (grouped-query attention: K and V are narrower)."""
    kv = t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    return {
        "q_proj": (t.hidden_size, t.hidden_size),
        "k_proj": (t.hidden_size, kv),
        "v_proj": (t.hidden_size, kv),
        "o_proj": (t.hidden_size, t.hidden_size),
        "gate_proj": (t.hidden_size, t.intermediate_size),
        "up_proj": (t.hidden_size, t.intermediate_size),
        "down_proj": (t.intermediate_size, t.hidden_size),
    }


def flops_per_sample(cfg, model_config, tokens: float, tokens_sq: float, labels: float) -> float:
    """The formula in the module docstring, from the config alone (no model in memory). tokens / tokens_sq / labels:
    mean s, mean s^2 and mean label tokens over the run's samples."""
    t, v = model_config.text_config, model_config.vision_config
    dims = projection_dims(t)
    n_lm = t.num_hidden_layers * sum(i * o for i, o in dims.values())
    n_lora = (
        t.num_hidden_layers
        * cfg.lora.r
        * sum(i + o for name, (i, o) in dims.items() if name in cfg.lora.target_modules)
    )
    n_proj = v.hidden_size * t.hidden_size + t.hidden_size * t.hidden_size  # trained, on the image tokens only
    p = (v.image_size // v.patch_size) ** 2 + 1  # CLIP positions (patches + CLS)
    n_vision = v.num_hidden_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    lm = (4 * n_lm + 6 * n_lora) * tokens + 6 * t.num_hidden_layers * t.hidden_size * tokens_sq
    head_flops = 4 * t.hidden_size * t.vocab_size * labels  # frozen LM head at the label positions
    vision = 2 * n_vision * p + 4 * v.num_hidden_layers * v.hidden_size * p * p + 6 * n_proj * (p - 1)
    return lm + head_flops + vision


def sample_lengths(cfg, data, tokenizer, image_token_id: int, n_image: int, n: int) -> tuple[list[int], list[int]]:
    """(real tokens, label tokens) of the run's first n Stage B positions (the same stream the loop draws)."""
    from datasets_io.tokens import build_sample
    from training.data import StageStream, StreamSpec

    stream = StageStream(
        "B", data.train["B"], StreamSpec(cfg.train.seed, cfg.curriculum.replay_fraction, cfg.curriculum.ehr_dropout)
    )
    lengths, labels = [], []
    for pos in range(n):
        prompt, target, _, _ = stream.item(pos)
        tok = build_sample(
            tokenizer,
            prompt,
            target,
            image_token_id=image_token_id,
            num_image_tokens=n_image,
            max_len=cfg.data.max_seq_len,
            overlong="shorten_ehr",
        )
        lengths.append(len(tok.input_ids))
        labels.append(sum(x != -100 for x in tok.labels))
    return lengths, labels


def measured_sps(summary: dict, skip: int = 2) -> list[float]:
    from mlflow import MlflowClient

    history = MlflowClient(summary["tracking_uri"]).get_metric_history(summary["mlflow_run_id"], "train/samples_per_s")
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    return values[skip:] or values


def run(args: argparse.Namespace, tmp: Path) -> list[dict]:
    import torch

    from datasets_io.config import load_config
    from launcher.local import corpus_texts, ensure_data, load_run_data, run_local

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    sets = [
        f"data.root={tmp}/data",
        "data.synth_if_missing=true",
        "data.synth_studies=120",
        f"data.max_seq_len={args.seq}",
        "curriculum.stage_split=0.0",
        "curriculum.ehr_dropout=0.15",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.batch}",
        "train.grad_accum=1",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.val_batches=0",
        "train.eval_every=0",
        "train.save_every=0",
        f"model.dtype={args.dtype}",
        f"model.attn_implementation={args.attn}",
        f"model.gradient_checkpointing={str(args.grad_ckpt).lower()}",
        f"train.packing={str(args.packing).lower()}",
        "mlflow.register_at_end=false",
        f"ray.use_gpu={str(args.device == 'cuda').lower()}",
        "ray.num_workers=1",
        f"ray.cpus_per_worker={args.cpus_per_worker}",
        f"ray.storage_path={tmp}/ray",
        "ray.max_failures=0",
    ]
    cfg_file = REPO / "configs" / SHAPES[args.shape]["config"]
    sets += SHAPES[args.shape].get("sets", [])  # tiny: LoRA + projector only, as the 7B trains (the FLOP formula's)
    cfg = load_config(cfg_file, sets + [f"output.dir={tmp}/base"])
    ensure_data(cfg)
    data = load_run_data(cfg)
    base = build_base(args.shape, cfg, corpus_texts(data), tmp / "base_model", args.device, dtype)
    sets.append(f"model.name_or_path={base}")
    if args.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_mistral  # raises if not installed: say so

        apply_liger_kernel_to_mistral(rope=True, rms_norm=True, swiglu=True, cross_entropy=False)

    from transformers import AutoTokenizer, LlavaConfig

    from training.model import num_image_tokens

    model_config = LlavaConfig.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    lengths, labels = sample_lengths(
        cfg, data, tok, model_config.image_token_index, num_image_tokens(model_config), args.steps * args.batch
    )
    mean_s = statistics.fmean(lengths)
    mean_s2 = statistics.fmean(x * x for x in lengths)
    flops = flops_per_sample(cfg, model_config, mean_s, mean_s2, statistics.fmean(labels))
    rows = []
    for runtime in args.runtimes:
        out = tmp / runtime
        if runtime == "local":
            run_cfg = load_config(cfg_file, sets + [f"output.dir={out}"])
            summary = run_local(run_cfg, device=args.device, show_progress=False)
        else:
            from launcher.ray_train import run_ray

            stage = runtime.removeprefix("ray-zero")
            run_cfg = load_config(
                cfg_file,
                sets + [f"output.dir={out}", f"deepspeed.zero_stage={stage}", f"ray.name=gpu-throughput-{runtime}"],
            )
            summary = run_ray(run_cfg, num_workers=1, use_gpu=args.device == "cuda")
        sps = statistics.median(measured_sps(summary))
        rows.append(
            {
                "runtime": runtime,
                "samples_per_s": sps,
                "tokens_per_s": sps * mean_s,
                "mfu": sps * flops / (args.peak_tflops * 1e12),
                "tflop_per_sample": flops / 1e12,
                "mean_tokens": mean_s,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="7b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default="bf16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4, help="micro-batch size")
    ap.add_argument("--seq", type=int, default=2048, help="data.max_seq_len (the packing budget)")
    ap.add_argument("--attn", default="sdpa", help="sdpa | flash_attention_2 | eager | packed_sdpa")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    ap.add_argument(
        "--packing", action=argparse.BooleanOptionalAction, default=True, help="train.packing (the config default: on)"
    )
    ap.add_argument("--liger", action="store_true", help="Liger kernels (local runtime; needs liger_kernel)")
    ap.add_argument("--runtimes", nargs="+", default=["local"], choices=["local", "ray-zero2", "ray-zero3"])
    ap.add_argument("--cpus-per-worker", type=float, default=4.0)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense peak at --dtype")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        rows = run(args, Path(d))
    flags = (
        f"attn={args.attn} grad_ckpt={args.grad_ckpt} packing={args.packing} liger={args.liger} "
        f"dtype={args.dtype} batch={args.batch} seq={args.seq}"
    )
    print(
        f"\nshape {args.shape} on {args.device} ({flags}); {rows[0]['tflop_per_sample']:.3f} TFLOP per sample "
        f"(model FLOPs, formula in the docstring), {rows[0]['mean_tokens']:.0f} real tokens per sample"
    )
    print(f"| runtime | samples/s | tokens/s | MFU (peak {args.peak_tflops:g} TFLOP/s) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['runtime']} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['mfu'] * 100:.2f}% |")
    return rows


if __name__ == "__main__":
    main()
