"""Peak memory of `launcher model convert-llava-med` on a multi-shard checkpoint, against the largest input shard.

    python benchmarks/convert_memory.py                          # 4 shards x ~150 MB (bf16), about a minute
    python benchmarks/convert_memory.py --layers 32 --shards 8 --json

Writes a random original-layout (llava_mistral) checkpoint with the release's key names and shard order into a
temporary directory, converts it in a fresh subprocess, and reports that process's peak RSS (VmHWM) next to the
peak of a subprocess that only imports the same modules (the floor: torch + transformers) and the size of the
largest shard. The converter streams one tensor at a time, so peak - floor should be about the largest single
tensor (embed_tokens / lm_head), well under a shard; a shard-at-a-time converter would sit at >= 1 shard.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Run in the child: the conversion, then its own peak RSS. The floor child stops after the imports.
CHILD = """
import os, sys, json
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, {repo!r})
from training.convert_llava_med.convert import convert
from transformers import LlavaForConditionalGeneration, LlavaProcessor, MistralForCausalLM, AutoTokenizer
if {run!r}:
    convert({src!r}, {tower!r}, {out!r}, log=lambda line: print(line, file=sys.stderr))
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"peak_rss_bytes": hwm * 1024}}))
"""


def write_original_checkpoint(
    src: Path, tower: Path, *, layers: int, hidden: int, intermediate: int, vocab: int, shards: int
) -> list[int]:
    """Random bf16 weights under the llava_mistral key names, sharded like the release; returns the shard sizes."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast

    heads, kv_heads, mm_hidden = hidden // 128, max(1, hidden // 512), 64
    head_dim = hidden // heads
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden)),
               ("model.mm_projector.0.weight", (hidden, mm_hidden)), ("model.mm_projector.0.bias", (hidden,)),
               ("model.mm_projector.2.weight", (hidden, hidden)), ("model.mm_projector.2.bias", (hidden,))]  # fmt: skip
    total = sum(2 * _numel(s) for _, s in shapes)
    target = total / shards

    src.mkdir(parents=True)
    weight_map, sizes, chunk, chunk_bytes = {}, [], {}, 0
    names = []

    def flush() -> None:
        nonlocal chunk, chunk_bytes
        name = f"model-{len(names) + 1:05d}-of-{shards:05d}.safetensors"
        names.append(name)
        save_file(chunk, src / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
        sizes.append((src / name).stat().st_size)
        chunk, chunk_bytes = {}, 0

    for key, shape in shapes:
        t = torch.randn(shape, dtype=torch.bfloat16) * 0.02
        if key.endswith("layernorm.weight") or key == "model.norm.weight":
            t = torch.ones(shape, dtype=torch.bfloat16)
        chunk[key] = t
        chunk_bytes += 2 * t.numel()
        if chunk_bytes >= target and len(names) < shards - 1:
            flush()
    flush()
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = {
        "architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False,
        "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
        "image_aspect_ratio": "pad", "mm_hidden_size": mm_hidden, "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    }  # fmt: skip
    (src / "config.json").write_text(json.dumps(config, indent=2))
    # A word-level tokenizer with exactly `vocab` entries, so <image>/<pad> grow the embeddings as in the real one.
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(src)
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=mm_hidden,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        )
    ).save_pretrained(tower)
    return sizes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def child_peak(src: Path, tower: Path, out: Path, run: bool) -> tuple[int, float]:
    code = CHILD.format(repo=str(REPO), src=str(src), tower=str(tower), out=str(out), run=run)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temporary dir, removed)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="convert_memory_", dir=args.workdir))
    try:
        src, tower, out = work / "src", work / "tower", work / "out"
        t0 = time.perf_counter()
        sizes = write_original_checkpoint(
            src,
            tower,
            layers=args.layers,
            hidden=args.hidden,
            intermediate=args.intermediate,
            vocab=args.vocab,
            shards=args.shards,
        )
        write_s = time.perf_counter() - t0
        floor, _ = child_peak(src, tower, out, run=False)
        peak, convert_s = child_peak(src, tower, out, run=True)
        largest_tensor = 2 * args.vocab * args.hidden  # embed_tokens / lm_head in bf16
        out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        result = {
            "shards": len(sizes),
            "checkpoint_mb": round(sum(sizes) / 1e6, 1),
            "largest_shard_mb": round(max(sizes) / 1e6, 1),
            "largest_tensor_mb": round(largest_tensor / 1e6, 1),
            "import_floor_rss_mb": round(floor / 1e6, 1),
            "peak_rss_mb": round(peak / 1e6, 1),
            "peak_minus_floor_mb": round((peak - floor) / 1e6, 1),
            "peak_minus_floor_over_largest_shard": round((peak - floor) / max(sizes), 2),
            "output_mb": round(out_bytes / 1e6, 1),
            "convert_s": round(convert_s, 1),
            "write_s": round(write_s, 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"original-layout checkpoint: {result['shards']} shards, {result['checkpoint_mb']} MB "
        f"(largest shard {result['largest_shard_mb']} MB, largest tensor {result['largest_tensor_mb']} MB)"
    )
    print(f"peak RSS, imports only:   {result['import_floor_rss_mb']:8.1f} MB")
    print(f"peak RSS, conversion:     {result['peak_rss_mb']:8.1f} MB  ({result['convert_s']} s, child process)")
    print(
        f"conversion above imports: {result['peak_minus_floor_mb']:8.1f} MB = "
        f"{result['peak_minus_floor_over_largest_shard']} x the largest shard"
    )


if __name__ == "__main__":
    main()
