"""Export a trained model for serving: LoRA folded into the base, the trained projector in place.

    launcher export --checkpoint runs/tiny/checkpoints/final --format hf --out exports/tiny-hf
    launcher export --model models:/cxr-report-generator@candidate --tracking-uri URI --format hf --out exports/hf
    vllm serve exports/hf          (or LlavaForConditionalGeneration.from_pretrained + AutoProcessor.from_pretrained)

`--format hf` writes a standard `LlavaForConditionalGeneration` directory: config.json, model.safetensors, the
tokenizer, preprocessor_config.json (transformers' PIL LLaVA image processor: pad to square with the mean colour,
resize, normalize: the training path's preprocessing) and a processor_config.json / chat template tying them, so
`AutoProcessor.from_pretrained(DIR).apply_chat_template(...)` renders exactly the prompt text the model was trained on.
`--format gguf` (training/export_gguf.py) starts from the same merged model.

Merging: `PeftModel.merge_and_unload()` adds scale * B @ A to each LoRA'd weight and replaces every
`modules_to_save` wrapper (the projector; the vision tower and embeddings when they were trained) by its trained copy.
It runs in fp32 (the bundle is loaded in fp32: ~4 bytes per parameter of RAM, ~30 GB for a 7B model) and the result is
then cast to --dtype. Written as OUT.partial and renamed when complete: an interrupted export never looks finished.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from datasets_io.errors import LauncherError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPORT_INFO = "export.json"

# The prompt the model was trained on when the tokenizer has no chat template (the tiny model's):
# `{bos}{user text}\n` (datasets_io.tokens.prompt_text), the answer follows and ends with EOS. The image is inline in
# the user text ("Image:<image>\n..."); in the list form an image part renders as "<image>" where it stands. The
# model never saw a system turn; one (llama.cpp renders an example with one at start-up) is written as a line of text.
PLAIN_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set ns = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = ns.text -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- text + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- text + eos_token -}}"
    "{%- else -%}{{- text + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@dataclass
class MergedModel:
    """A plain LlavaForConditionalGeneration (no PEFT wrappers) with what serving it needs."""

    model: Any
    tokenizer: Any
    bundle: Any  # training.model.ModelBundle of the merged model (image spec, image token, token count)
    source: dict = field(default_factory=dict)  # provenance written to export.json: no patient data


def load_merged(
    checkpoint: str | Path | None = None, model_uri: str | None = None, tracking_uri: str | None = None
) -> MergedModel:
    """Base + adapter from a checkpoint directory or a registered `models:/NAME@ALIAS`, merged, in fp32."""
    from training.model import bundle_for, load_trained

    if (checkpoint is None) == (model_uri is None):
        raise LauncherError("give exactly one of --checkpoint DIR and --model models:/NAME@ALIAS")
    if checkpoint is not None:
        bundle = load_trained(str(checkpoint))
        adapter_dir = Path(checkpoint)
        source = {"checkpoint": str(Path(checkpoint).resolve())}
    else:
        from training.registry import load_registered_bundle

        bundle, info = load_registered_bundle(model_uri, tracking_uri)
        adapter_dir = Path(info["adapter_dir"])
        source = {"model_uri": model_uri, "run_id": info["run_id"]}
    state = _read_json(adapter_dir / "trainer_state.json")
    source.update(
        {
            "base_model": bundle.base_model_path,
            "global_step": state.get("global_step"),
            "lora": _read_json(adapter_dir / "adapter_config.json").get("r"),
        }
    )
    merged = bundle.model.merge_and_unload()  # LoRA folded in, modules_to_save copies put in place
    merged.eval()
    return MergedModel(merged, bundle.tokenizer, bundle_for(merged, bundle.tokenizer, bundle.base_model_path), source)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def resolve_dtype(name: str, base_model_path: str) -> str:
    """`auto`: the dtype the base model is stored in (its config.json), fp32 when it does not say."""
    if name != "auto":
        return name
    cfg = _read_json(Path(base_model_path) / "config.json")
    stored = cfg.get("dtype") or cfg.get("torch_dtype") or cfg.get("text_config", {}).get("dtype")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(stored), "fp32")


def chat_template(tokenizer: Any) -> str:
    """The tokenizer's own template (a converted LLaVA-Med has one), else the plain prompt format trained here."""
    return getattr(tokenizer, "chat_template", None) or PLAIN_CHAT_TEMPLATE


def build_processor(merged: MergedModel) -> Any:
    """LlavaProcessor: the tokenizer with the chat template and the PIL LLaVA image processor at the training spec.

    do_pad=True pads to a square with the mean colour before the resize, as datasets_io.images does; the resize is
    bilinear, as there. `num_additional_image_tokens=1` is CLIP's CLS, which the "default" strategy drops again."""
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    config = merged.model.config
    spec = merged.bundle.image_spec
    image_processor = LlavaImageProcessorPil(
        do_pad=True,
        size={"shortest_edge": spec.size},
        crop_size={"height": spec.size, "width": spec.size},
        image_mean=list(spec.mean),
        image_std=list(spec.std),
        resample=2,
        do_center_crop=True,
        do_convert_rgb=True,
    )
    template = chat_template(merged.tokenizer)
    merged.tokenizer.chat_template = template
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=merged.tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=template,
    )


def partial_dir(out: Path, overwrite: bool) -> Path:
    """A fresh OUT.partial to write into; OUT itself must not exist unless overwrite."""
    if out.exists() and not overwrite:
        raise LauncherError(f"--out {out} exists: choose another directory or pass --overwrite")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def finish(partial: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def export_hf(merged: MergedModel, out: str | Path, dtype: str = "auto", overwrite: bool = False) -> dict:
    """Write the merged model as an HF LLaVA directory at `out` (atomically). Returns the summary (export.json)."""
    from transformers import GenerationConfig

    out = Path(out)
    dtype = resolve_dtype(dtype, merged.bundle.base_model_path)
    partial = partial_dir(out, overwrite)
    save_weights(merged.model, partial, DTYPES[dtype])
    build_processor(merged).save_pretrained(partial)
    merged.tokenizer.save_pretrained(partial)  # tokenizer_config.json with the template, for AutoTokenizer alone
    tok = merged.tokenizer
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False
    ).save_pretrained(partial)
    summary = {
        "format": "hf",
        "out": str(out),
        "dtype": dtype,
        **merged.source,
        "parameters": sum(p.numel() for p in merged.model.parameters()),
        "files": sorted(p.name for p in partial.iterdir()) + [EXPORT_INFO],
    }
    (partial / EXPORT_INFO).write_text(json.dumps(summary, indent=2) + "\n")
    finish(partial, out)
    return summary


def save_weights(model: Any, out: Path, dtype: torch.dtype) -> None:
    """save_pretrained with the weights cast to `dtype` on the way out: the in-memory merged model stays fp32 (a
    bf16 round trip in place would lose what the GGUF export and the comparisons need). save_pretrained records the
    in-memory dtype, so config.json's `dtype` entries are set to the stored one afterwards."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
    for section in (config, config.get("text_config", {}), config.get("vision_config", {})):
        if "dtype" in section:
            section["dtype"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
