"""--verify: the original LLaVA-Med forward rebuilt by hand (MistralForCausalLM with the original weights, the CLIP
tower, the projector applied by hand and spliced in where LLaVA's -200 placeholder is) and the converted model, run on
the same image and prompt; any logit apart by more than the tolerance fails the conversion. The chat template and the
image processor are checked against LLaVA's own prompt and expand2square + CLIP preprocessing on the way."""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from datasets_io.errors import LauncherError
from training.convert_llava_med.plan import OUT_DTYPES, SRC_TOWER_PREFIX, mistral_config
from training.convert_llava_med.processor import IMAGE_TOKEN, image_processor_for
from training.convert_llava_med.source import (
    SourceInfo,
    load_source_tokenizer,
    quiet_transformers,
    read_source_info,
    weight_files,
)

# The LLaVA repo's placeholder id for the image in a token list (llava/constants.py): the original tokenizer has no
# image token; `tokenizer_image_token` splits the prompt at "<image>" and puts -200 between the chunks.
ORIGINAL_IMAGE_TOKEN_INDEX = -200


@dataclass
class VerifyReport:
    max_abs_diff: float  # over every position, original vocabulary columns
    max_abs_diff_text: float  # over the text positions only
    positions: int
    text_positions: int
    image_positions: int
    tolerance: float
    pixel_max_abs_diff: float
    chat_template_matches: bool
    processor_tokens_match: bool
    dtype: str
    seconds: float


def verify_conversion(
    src: Path,
    vision_tower: Path,
    converted: Path,
    *,
    tolerance: float = 1e-4,
    dtype: str = "fp32",
    device: str = "cpu",
    image_path: Path | None = None,
    allow_pickle: bool = False,
    question: str = "Describe the findings of this chest X-ray.",
    answer: str = "The lungs are clear. There is no pleural effusion or pneumothorax.",
    log: Callable[[str], None] = print,
) -> VerifyReport:
    """Run the original layout and the converted model on the same image and prompt; raise LauncherError if any logit
    differs by more than `tolerance` (or the converted model loads with missing or unexpected weights)."""
    from transformers import AutoProcessor

    t0 = time.perf_counter()
    compute_dtype = OUT_DTYPES[dtype]
    info = read_source_info(src, vision_tower)
    conv_config = json.loads((converted / "config.json").read_text())
    storage_dtype = getattr(torch, conv_config.get("dtype") or "float32")
    image_token_id, n_image = conv_config["image_token_index"], conv_config["image_seq_length"]

    # The prompt, both ways: LLaVA's template + tokenizer_image_token on the original tokenizer, and the converted
    # chat template. The logits are compared on one id sequence (the original's, image placeholder expanded).
    prompt = original_llava_prompt([("USER", f"{IMAGE_TOKEN}\n{question}"), ("ASSISTANT", answer)])
    original_ids = tokenizer_image_token(prompt, load_source_tokenizer(src))
    processor = AutoProcessor.from_pretrained(converted)
    check_chat_template(processor.tokenizer, prompt, question, answer)

    # The image, both ways: LLaVA's expand2square + the tower's CLIP processor, and the converted processor.
    image = verification_image(image_path)
    converted_inputs = processor(text=prompt, images=image, return_tensors="pt")
    pixel_values = converted_inputs["pixel_values"]  # (1, 3, S, S)
    original_pixels = original_pixel_values(image, vision_tower, info)
    pixel_diff = float((original_pixels - pixel_values).abs().max())

    expanded = expand_image_placeholder(original_ids, image_token_id, n_image)
    processor_ids = converted_inputs["input_ids"][0].tolist()
    if processor_ids != expanded:
        log(
            "note: the converted processor tokenizes the prompt differently from LLaVA's tokenizer_image_token "
            f"({len(processor_ids)} vs {len(expanded)} ids; LLaVA tokenizes the text after <image> as a separate "
            "string). Logits are compared on LLaVA's ids."
        )

    log(f"verify: original layout ({len(expanded)} positions, {n_image} image, dtype {dtype}, device {device}) ...")
    ref = reference_logits(
        src, vision_tower, info, original_ids, original_pixels, storage_dtype, compute_dtype, device, allow_pickle
    )
    log("verify: converted model ...")
    # (T, V_original): the two new tokens' columns have no counterpart in the original
    logits = converted_logits(converted, expanded, pixel_values, compute_dtype, device)[:, : ref.shape[1]]
    return judge_logits(
        ref, logits, torch.tensor([i != image_token_id for i in expanded]), tolerance, log,
        pixel_max_abs_diff=pixel_diff, chat_template_matches=True, processor_tokens_match=processor_ids == expanded,
        dtype=dtype, t0=t0,
    )  # fmt: skip


def verification_image(path: Path | None):
    """The image both models see: the user's, or a fixed non-square RGB pattern (exercises the square padding)."""
    from PIL import Image

    if path is not None:
        return Image.open(path).convert("RGB")
    y, x = np.mgrid[0:300, 0:360].astype(np.float32)
    rng = np.random.default_rng(0)
    base = 128 + 80 * np.sin(x / 23.0) * np.cos(y / 31.0) + rng.normal(0, 20, size=(300, 360))
    rgb = np.stack([base, base * 0.9 + 10, base * 0.8 + 20], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def check_chat_template(tokenizer, prompt: str, question: str, answer: str) -> None:
    """The converted chat template must render the one-turn conversation exactly as LLaVA's template did."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    if rendered != (tokenizer.bos_token or "") + prompt:
        raise LauncherError(f"converted chat template renders {rendered!r}, the original prompt is {prompt!r}")


def original_pixel_values(image, vision_tower: Path, info: SourceInfo) -> torch.Tensor:
    """LLaVA's preprocessing: expand2square (with image_aspect_ratio "pad") + the tower's CLIP processor. (1, 3, S, S)"""
    from transformers import AutoImageProcessor

    if (vision_tower / "preprocessor_config.json").is_file():
        tower_processor = AutoImageProcessor.from_pretrained(vision_tower)
    else:
        tower_processor, _ = image_processor_for(vision_tower, info.vision_config, pad_to_square=False)
    if info.pad_to_square:
        image = expand2square(image, tuple(int(x * 255) for x in tower_processor.image_mean))
    return tower_processor(image, return_tensors="pt")["pixel_values"]


def expand_image_placeholder(ids: list[int], image_token_id: int, n_image: int) -> list[int]:
    """LLaVA's ids with its -200 placeholder replaced by `n_image` converted image tokens: the converted model's ids."""
    expanded: list[int] = []
    for i in ids:
        expanded.extend([image_token_id] * n_image if i == ORIGINAL_IMAGE_TOKEN_INDEX else [i])
    return expanded


def converted_logits(
    converted: Path, input_ids: list[int], pixel_values: torch.Tensor, compute_dtype: torch.dtype, device: str
) -> torch.Tensor:
    """The converted LlavaForConditionalGeneration's logits (T, V) in fp32; it must load with no missing or unexpected
    weights."""
    from transformers import LlavaForConditionalGeneration

    with quiet_transformers():
        model, load_info = LlavaForConditionalGeneration.from_pretrained(
            converted, dtype=compute_dtype, output_loading_info=True
        )
    bad = {k: sorted(v)[:5] for k, v in load_info.items() if k != "error_msgs" and v}
    if bad or load_info.get("error_msgs"):
        raise LauncherError(f"converted model does not load cleanly: {bad or load_info['error_msgs']}")
    model = model.to(device).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([input_ids], device=device), pixel_values=pixel_values.to(compute_dtype).to(device)
        )
    logits = out.logits[0].float().cpu()
    del model, out
    gc.collect()
    return logits


def judge_logits(
    ref: torch.Tensor,
    logits: torch.Tensor,
    is_text: torch.Tensor,
    tolerance: float,
    log: Callable[[str], None],
    *,
    t0: float,
    **checks,
) -> VerifyReport:
    """The report of the comparison (`checks`: its other fields), logged; raises when a logit is further apart than
    `tolerance` (or not finite). `ref`, `logits`: (T, V_original); `is_text`: (T,) bool."""
    if logits.shape != ref.shape:
        raise LauncherError(f"logit shapes differ: converted {tuple(logits.shape)}, original {tuple(ref.shape)}")
    diff = (logits - ref).abs()  # (T, V)
    report = VerifyReport(
        max_abs_diff=float(diff.max()),
        max_abs_diff_text=float(diff[is_text].max()),
        positions=len(is_text),
        text_positions=int(is_text.sum()),
        image_positions=int((~is_text).sum()),
        tolerance=tolerance,
        seconds=round(time.perf_counter() - t0, 1),
        **checks,
    )
    log(
        f"verify: max |logit difference| = {report.max_abs_diff:.3g} over {report.positions} positions "
        f"(text positions: {report.max_abs_diff_text:.3g}; tolerance {tolerance:g}; pixel difference "
        f"{report.pixel_max_abs_diff:.3g}; logit scale {float(ref.abs().max()):.3g})"
    )
    if not math.isfinite(report.max_abs_diff) or report.max_abs_diff > tolerance:
        worst = int(diff.amax(dim=1).argmax())
        raise LauncherError(
            f"verification FAILED: max |logit difference| {report.max_abs_diff:.3g} > tolerance {tolerance:g} "
            f"(worst at position {worst} of {report.positions}, {'text' if is_text[worst] else 'image'})"
        )
    return report


# ---------------------------------------------------------------------------------------------------------------------
# The original model, rebuilt
# ---------------------------------------------------------------------------------------------------------------------


def reference_logits(
    src: Path,
    vision_tower: Path,
    info: SourceInfo,
    input_ids: list[int],
    pixel_values: torch.Tensor,
    storage_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    device: str,
    allow_pickle: bool,
) -> torch.Tensor:
    """The original LLaVA forward: MistralForCausalLM with the original weights, CLIPVisionModel from the tower dir, the
    projector by hand (Linear -> GELU -> Linear on layer `select_layer`'s patch features without CLS), its output
    spliced into the input embeddings where the -200 placeholder is, as prepare_inputs_labels_for_multimodal does.

    Weights are rounded to the converted checkpoint's storage dtype first (what the original runtime does when it
    casts the fp32 CLIP tower to the model dtype), so a difference means a conversion error, not a rounding choice.
    Returns logits (T, V_original) in fp32.
    """
    lm, tower, proj = load_reference(src, vision_tower, info, storage_dtype, compute_dtype, device, allow_pickle)
    ids = torch.tensor(input_ids)
    (where,) = torch.nonzero(ids == ORIGINAL_IMAGE_TOKEN_INDEX, as_tuple=True)
    if len(where) != 1:
        raise LauncherError(f"verification prompt must hold exactly one image, got {len(where)}")
    p = int(where[0])
    with torch.no_grad():
        pixels = pixel_values.to(compute_dtype).to(device)  # (1, 3, S, S), as the converted model gets them
        hidden = tower(pixels, output_hidden_states=True).hidden_states[info.select_layer]  # (1, 1+N, C)
        feats = hidden[:, 1:] if info.select_strategy == "default" else hidden
        w0, b0, w2, b2 = (proj[f"model.mm_projector.{i}.{kind}"] for i in (0, 2) for kind in ("weight", "bias"))
        feats = F.linear(F.gelu(F.linear(feats, w0, b0)), w2, b2)  # (1, N, D); nn.GELU() is the erf form
        embed = lm.get_input_embeddings()
        text = embed(torch.cat([ids[:p], ids[p + 1 :]]).to(device))  # (T-1, D): all text at once, then split
        inputs_embeds = torch.cat([text[:p], feats[0], text[p:]]).unsqueeze(0)  # (1, T-1+N, D)
        logits = lm(inputs_embeds=inputs_embeds).logits[0].float().cpu()
    del lm, tower
    gc.collect()
    return logits


def load_reference(
    src: Path,
    vision_tower: Path,
    info: SourceInfo,
    storage_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    device: str,
    allow_pickle: bool,
):
    """(MistralForCausalLM, CLIPVisionModel, projector tensors) of the original layout, every weight rounded to
    `storage_dtype` and computed in `compute_dtype` on `device`. The tower is the CLIP dir's, or with
    unfreeze_mm_vision_tower the checkpoint's own."""
    from transformers import CLIPVisionModel, MistralForCausalLM

    with quiet_transformers():
        text_config = mistral_config(info.src_config, info.src_config["vocab_size"], None)
        proj = _read_source_tensors(src, allow_pickle, lambda k: k.startswith("model.mm_projector."))
        lm, lm_info = MistralForCausalLM.from_pretrained(
            src, config=text_config, dtype=compute_dtype, output_loading_info=True
        )
        if lm_info["missing_keys"] or lm_info["mismatched_keys"]:
            raise LauncherError(
                f"reference model: the original checkpoint did not fill MistralForCausalLM: missing "
                f"{sorted(lm_info['missing_keys'])[:5]}, mismatched {sorted(lm_info['mismatched_keys'])[:5]}"
            )
        tower, tower_info = CLIPVisionModel.from_pretrained(vision_tower, dtype=compute_dtype, output_loading_info=True)
        if tower_info["missing_keys"]:
            raise LauncherError(f"reference vision tower is missing {sorted(tower_info['missing_keys'])[:5]}")
        if info.tower_from_source:
            tower_sd = _read_source_tensors(src, allow_pickle, lambda k: k.startswith(SRC_TOWER_PREFIX))
            tower.load_state_dict({k[len(SRC_TOWER_PREFIX) :]: v for k, v in tower_sd.items()}, strict=True)
    for module in (lm, tower):
        for param in module.parameters():  # parameters only: buffers (rotary inv_freq) stay as computed at init
            param.data = param.data.to(storage_dtype).to(compute_dtype)
    proj = {k: v.to(storage_dtype).to(compute_dtype).to(device) for k, v in proj.items()}
    return lm.to(device).eval(), tower.to(device).eval(), proj


def original_llava_prompt(turns: list[tuple[str, str | None]], system: str = "") -> str:
    """LLaVA's Conversation.get_prompt() for SeparatorStyle.LLAMA_2 with conv_mistral_instruct's sep="", sep2="</s>".

    `turns` alternate (role, message) starting with the user; a None message is the open assistant turn.
    """
    sep, sep2 = "", "</s>"
    ret = ""
    for i, (_, message) in enumerate(turns):
        if message:
            if i == 0 and system:
                message = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + message
            if i % 2 == 0:
                ret += sep + f"[INST] {message} [/INST]"
            else:
                ret += " " + message + " " + sep2
    return ret.lstrip(sep)  # lstrip("") strips nothing, as in the original


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = ORIGINAL_IMAGE_TOKEN_INDEX) -> list[int]:
    """LLaVA's llava/mm_utils.py::tokenizer_image_token: tokenize the chunks around "<image>" separately (each with
    BOS, kept once) and put `image_token_index` between them."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]

    def insert_separator(x, sep):
        return [ele for sublist in zip(x, [sep] * len(x)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if prompt_chunks and prompt_chunks[0] and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def expand2square(image, background_color):
    """LLaVA's expand2square (upstream LLaVA; LLaVA-Med adds a random 0-1 px jitter to the offset, left out here)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background_color)
    result.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


def _read_source_tensors(src: Path, allow_pickle: bool, want: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Tensors of the original checkpoint whose name passes `want`, read with the safetensors library / torch.load (not
    this module's reader, so the reference does not share the conversion's code path)."""
    from safetensors import safe_open

    found = {}
    for path in weight_files(src, allow_pickle, "--src"):
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                found.update({k: f.get_tensor(k) for k in f.keys() if want(k)})
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            found.update({k: v.clone() for k, v in sd.items() if want(k)})
            del sd
    return found
