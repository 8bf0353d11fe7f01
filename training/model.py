"""Build the LLaVA model: from an HF-format checkpoint (local dir or hub id) or tiny from config; LoRA on the LM.

    bundle = build_model(cfg, train_texts)            # tiny: trains the tokenizer, builds + saves the base model
    bundle.model   # PeftModel: LoRA on model.language_model.layers.*.(self_attn|mlp).*_proj, projector trained fully

What trains (everything else is frozen):
- LoRA adapters on the language model's q/k/v/o/gate/up/down projections (never the vision tower: a plain
  `q_proj` target would also match CLIP's attention, so the target is a regex rooted at the LM);
- the projector, fully (`modules_to_save`), so it is saved with the adapter;
- optionally the vision tower and the token embeddings / LM head (`model.train_vision_tower`,
  `model.train_token_embeddings`): the tiny model's are random, so without this it could not learn pixels or the
  new tokenizer's vocabulary. A real LLaVA-Med keeps them frozen.

peft and the modeling classes (seconds of imports) are imported in the functions that build models: the Ray driver
uses only the config-level helpers here (`resolve_base_path`, `image_spec_for`, `num_image_tokens`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, CLIPVisionConfig, LlavaConfig, MistralConfig

from datasets_io.images import CLIP_MEAN, CLIP_STD, ImageSpec
from datasets_io.records import IMAGE_TOKEN
from datasets_io.tokens import IGNORE_INDEX
from datasets_io.config import Config
from datasets_io.errors import LauncherError
from training.packing import forward_passes, model_layout, register_packed_sdpa

log = logging.getLogger(__name__)

BASE_MODEL_DIRNAME = "base_model"
ORIGIN_FILE = "origin.json"  # what a tiny base was built from (corpus hash, tiny config, seed)
WEIGHTS_FILE = "model.safetensors"  # a tiny base's weights (one shard: it is a few MB)


@dataclass
class ModelBundle:
    model: Any  # PeftModel wrapping LlavaForConditionalGeneration
    tokenizer: Any
    image_spec: ImageSpec
    image_token_id: int
    num_image_tokens: int
    base_model_path: str  # what adapter_config.json's base_model_name_or_path points at

    @property
    def text_config(self) -> Any:
        """The language model's config (packing's attention span, training.data.Preprocessor.for_run)."""
        return self.model.config.text_config


def lora_target_regex(names: list[str]) -> str:
    """Only the language model's projections: CLIP's q_proj/k_proj/v_proj would match a plain name list."""
    return rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(names)})"


def modules_to_save(cfg: Config) -> list[str]:
    mods = ["multi_modal_projector"]
    if cfg.model.train_vision_tower:
        mods.append("vision_tower")
    if cfg.model.train_token_embeddings:
        mods += ["embed_tokens", "lm_head"]
    return mods


def tiny_vision_config(cfg: Config) -> CLIPVisionConfig:
    """The tiny base's CLIP vision tower (`model.tiny`)."""
    t = cfg.model.tiny
    return CLIPVisionConfig(
        hidden_size=t.vision_hidden,
        intermediate_size=4 * t.vision_hidden,
        num_hidden_layers=t.vision_layers,
        num_attention_heads=t.vision_heads,
        image_size=t.image_size,
        patch_size=t.patch_size,
        num_channels=3,
    )


def tiny_llava_config(cfg: Config, tokenizer: Any) -> LlavaConfig:
    t = cfg.model.tiny
    vision = tiny_vision_config(cfg)
    text = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.text_hidden,
        intermediate_size=t.text_intermediate,
        num_hidden_layers=t.text_layers,
        num_attention_heads=t.text_heads,
        num_key_value_heads=t.text_kv_heads,
        max_position_embeddings=max(1024, cfg.data.max_seq_len),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        sliding_window=None,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(t.image_size // t.patch_size) ** 2,
        vision_feature_select_strategy="default",  # drop CLS: one token per patch
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )


def build_tiny_base(
    cfg: Config, train_texts: list[str], out_dir: Path, weights: bool = True, stage_a: dict | None = None
) -> Path:
    """Train the BPE tokenizer on the corpus and write the tiny LLaVA's config, tokenizer, image spec and origin to
    `out_dir`; with `weights`, also its weights (`ensure_tiny_weights`, which needs `stage_a` when the vision tower is
    pre-trained). The Ray driver passes weights=False: drawing them needs transformers' modeling code (seconds of
    imports), which only the workers load, so rank 0 draws them there, from the saved config, before anyone loads the
    model."""
    from training.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(train_texts, cfg.model.tiny.vocab_size)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    config = tiny_llava_config(cfg, tokenizer)
    config.architectures = ["LlavaForConditionalGeneration"]  # what the model's own save_pretrained records
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "image_spec.json").write_text(
        json.dumps({"size": cfg.model.tiny.image_size, "mean": CLIP_MEAN, "std": CLIP_STD})
    )
    (tmp / ORIGIN_FILE).write_text(json.dumps(tiny_base_origin(cfg, train_texts), indent=2))
    tmp.rename(out_dir)
    if weights:
        ensure_tiny_weights(out_dir, cfg, stage_a)
    return out_dir


def ensure_tiny_weights(base: str | Path, cfg: Config, stage_a: dict | None) -> None:
    """Draw a tiny base's random weights (seeded, from its saved config), pre-train its vision tower on the Stage A
    training rows `stage_a` (a datasets_io.sampler.row_table; training/vision_pretrain.py) when
    `model.tiny.vision_pretrain_steps` > 0, and write them beside it, unless they are there already. The files are
    written to a temp dir and moved in with the weights file last, so a reader that finds the weights finds
    everything. The same config, seed and rows give the same weights bit for bit wherever they are drawn (tested), so
    a run built by the Ray driver + rank 0 starts where the local runtime's starts."""
    base = Path(base)
    if (base / WEIGHTS_FILE).is_file():
        return
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(cfg.train.seed)
    config = LlavaConfig.from_pretrained(base)
    model = LlavaForConditionalGeneration(config)
    steps = cfg.model.tiny.vision_pretrain_steps
    if steps:
        from datasets_io.config import image_cache_dir
        from datasets_io.image_cache import open_image_cache
        from training.vision_pretrain import pretrain_vision_tower

        if not stage_a or not stage_a["image"]:
            raise LauncherError(f"pre-training the tiny base's vision tower ({base}) needs Stage A training rows")
        _head, done = pretrain_vision_tower(
            model.model.vision_tower,
            stage_a["image"],
            stage_a["target"],
            data_root=cfg.data.root,
            spec=image_spec_for(str(base), config),
            steps=steps,
            lr=cfg.train.lr,
            batch_size=cfg.train.micro_batch_size,
            seed=cfg.train.seed,
            uncertain=cfg.model.tiny.vision_pretrain_uncertain,
            image_cache=open_image_cache(image_cache_dir(cfg)),  # the run's: its first epoch then finds them decoded
        )
        print(
            f"[model] tiny vision tower pre-trained on {done['images']} Stage A training images' CheXpert labels: "
            f"{steps} steps, final loss {done['final_loss']}, {done['seconds']:.1f}s",
            flush=True,
        )
    tmp = base / f".weights.tmp.{os.getpid()}"
    model.save_pretrained(tmp)
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == WEIGHTS_FILE):  # the weights file last
        f.replace(base / f.name)
    tmp.rmdir()


def image_spec_for(base_path: str, config: LlavaConfig) -> ImageSpec:
    p = Path(base_path) / "image_spec.json"
    if p.is_file():
        d = json.loads(p.read_text())
        return ImageSpec(d["size"], tuple(d["mean"]), tuple(d["std"]))
    pp = Path(base_path) / "preprocessor_config.json"
    if pp.is_file():
        d = json.loads(pp.read_text())
        return ImageSpec(
            config.vision_config.image_size, tuple(d.get("image_mean", CLIP_MEAN)), tuple(d.get("image_std", CLIP_STD))
        )
    return ImageSpec(config.vision_config.image_size)


def num_image_tokens(config: LlavaConfig) -> int:
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n if config.vision_feature_select_strategy == "default" else n + 1


def load_base(path: str, dtype: torch.dtype, attn_implementation: str | None = None) -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration, tokenizer) from a local dir or hub id; clear error when it is not there.
    `attn_implementation` (model.attn_implementation): transformers' attention backend; None = its default."""
    from transformers import LlavaForConditionalGeneration

    register_packed_sdpa()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation
        )
    except (OSError, ValueError) as e:
        raise LauncherError(
            f"cannot load base model {path!r}: {e.__class__.__name__}: {str(e).splitlines()[0]}. "
            "Give a local HF-format LLaVA directory (see `launcher model convert-llava-med`) or a reachable hub id."
        ) from None
    return model, tokenizer


def resolve_base_path(
    cfg: Config, train_texts: list[str] | None, weights: bool = True, stage_a: dict | None = None
) -> str:
    """The HF directory to load: `model.name_or_path`, or the run's tiny base (built on first use; `weights=False`
    leaves its weights to `ensure_tiny_weights`, see `build_tiny_base`; `stage_a`: the Stage A training row table its
    vision tower is pre-trained on)."""
    if cfg.model.name_or_path:
        return cfg.model.name_or_path
    base = Path(cfg.output.dir) / BASE_MODEL_DIRNAME
    if not base.is_dir():
        if train_texts is None:
            raise LauncherError(f"tiny base model not found at {base} and no corpus given to build it")
        base.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_base(cfg, train_texts, base, weights=weights, stage_a=stage_a)
    else:
        if train_texts is not None:
            check_tiny_base_origin(cfg, train_texts, base)
        if weights:
            ensure_tiny_weights(base, cfg, stage_a)
    return str(base)


def origin_exclusions(cfg: Config) -> set[str]:
    """`model.tiny` keys left out of a base's origin while at the value bases had before the key existed, so those
    bases still match: no pre-training (then nothing about it), and the U-Zeros pre-training targets."""
    t = cfg.model.tiny
    if not t.vision_pretrain_steps:
        return {"vision_pretrain_steps", "vision_pretrain_uncertain"}
    return {"vision_pretrain_uncertain"} if t.vision_pretrain_uncertain == 0.0 else set()


def tiny_base_origin(cfg: Config, train_texts: list[str]) -> dict:
    """What a tiny base is built from: its tokenizer is trained on the corpus, its weights drawn from the config."""
    import hashlib

    h = hashlib.blake2b(digest_size=12)
    for t in train_texts:
        h.update(t.encode())
        h.update(b"\x00")
    pretrain = cfg.model.tiny.vision_pretrain_steps
    origin = {
        "corpus_texts": len(train_texts),
        "corpus_hash": h.hexdigest(),
        "model.tiny": cfg.model.tiny.model_dump(exclude=origin_exclusions(cfg)),
        "train.seed": cfg.train.seed,
    }
    if pretrain:  # what else the vision tower's pre-training used
        origin["vision_pretrain"] = {"train.lr": cfg.train.lr, "train.micro_batch_size": cfg.train.micro_batch_size}
    return origin


def check_tiny_base_origin(cfg: Config, train_texts: list[str], base: Path) -> None:
    """Refuse to reuse `<output.dir>/base_model` for another corpus or tiny config: its tokenizer was trained on
    other text, and the bundles already in that output dir point at it, so it is never silently replaced."""
    now = tiny_base_origin(cfg, train_texts)
    path = base / ORIGIN_FILE
    saved = json.loads(path.read_text()) if path.is_file() else None
    if saved != now:
        what = (
            "it records no corpus (built by an older version)"
            if saved is None
            else "it was built from "
            + ", ".join(f"{k} {saved.get(k)!r} (now {v!r})" for k, v in now.items() if saved.get(k) != v)
        )
        raise LauncherError(
            f"the tiny base model {base} does not belong to this run's data and settings: {what}. "
            "Its tokenizer is trained on the corpus and its weights drawn with the seed, so use "
            f"another output.dir (or delete {base} and the checkpoints that point at it)."
        )


def apply_lora(cfg: Config, model: Any) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_target_regex(cfg.lora.target_modules),
        modules_to_save=modules_to_save(cfg),
        task_type=None,
    )
    peft_model = get_peft_model(model, peft_cfg)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return peft_model


def build_model(
    cfg: Config, train_texts: list[str] | None = None, dtype: torch.dtype = torch.float32, stage_a: dict | None = None
) -> ModelBundle:
    """The base (`resolve_base_path`: a tiny one built from `train_texts` and the Stage A row table `stage_a`) with
    LoRA."""
    base_path = resolve_base_path(cfg, train_texts, stage_a=stage_a)
    base, tokenizer = load_base(base_path, dtype, cfg.model.attn_implementation)
    model = apply_lora(cfg, base)
    return bundle_for(model, tokenizer, base_path)


def bundle_for(model: Any, tokenizer: Any, base_path: str) -> ModelBundle:
    config = model.config if isinstance(model.config, LlavaConfig) else model.base_model.model.config
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        image_spec=image_spec_for(base_path, config),
        image_token_id=config.image_token_index,
        num_image_tokens=num_image_tokens(config),
        base_model_path=base_path,
    )


def load_trained(checkpoint_dir: str, dtype: torch.dtype = torch.float32, base_path: str | None = None) -> ModelBundle:
    """Base + adapter bundle for inference (evaluate / predict / pyfunc): plain `PeftModel.from_pretrained`."""
    from peft import PeftModel

    ckpt = Path(checkpoint_dir)
    if not (ckpt / "adapter_config.json").is_file():
        raise LauncherError(f"{ckpt} is not an adapter bundle (no adapter_config.json)")
    base_path = base_path or json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"]
    base, _ = load_base(base_path, dtype)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model = PeftModel.from_pretrained(base, ckpt)
    model.eval()
    return bundle_for(model, tokenizer, base_path)


def load_adapter_weights(model: Any, ckpt_dir: str | Path) -> None:
    """Load a bundle's trained tensors (LoRA + modules_to_save) into a live PeftModel, for resuming."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise LauncherError(f"cannot resume: {path} is missing")
    from peft import get_peft_model_state_dict

    saved = load_file(str(path))
    missing = sorted(set(get_peft_model_state_dict(model)) - set(saved))  # e.g. the projector: it would stay at init
    if missing:
        raise LauncherError(
            f"cannot resume from {ckpt_dir}: {len(missing)} trained tensor(s) missing from "
            f"{path.name}, e.g. {missing[:3]}; the bundle is incomplete or from another model"
        )
    result = set_peft_model_state_dict(model, saved)
    if result.unexpected_keys:
        raise LauncherError(
            f"cannot resume from {ckpt_dir}: adapter tensors do not match the model: {list(result.unexpected_keys)[:5]}"
        )


def trainable_parameter_groups(model: Any, lr: float, projector_lr: float, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: LoRA (and other trained modules) at `lr`, the projector at `projector_lr`."""
    projector, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (projector if "multi_modal_projector" in name else rest).append(p)
    groups = [
        {"params": rest, "lr": lr, "name": "lora"},
        {"params": projector, "lr": projector_lr or lr, "name": "projector"},
    ]
    for g in groups:
        g["weight_decay"] = weight_decay
    return [g for g in groups if g["params"]]


def label_loss(model: Any, batch: dict[str, torch.Tensor], prompt_weight: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy over the target's label tokens, the same value as `model(**batch).loss`, plus,
    when the batch has `prompt_labels` (train.prompt_loss_weight > 0), `prompt_weight` x the mean over the prompt's
    text tokens. Each part is its own mean, so their balance is `prompt_weight` whatever their token counts (in one
    mean over all tokens a MIMIC-length Patient Data block, hundreds of tokens, would outweigh the answer), and the
    target's gradient is the target-only run's. The LM head and softmax run only at the positions that predict a label (`logits_to_keep` as
    a boolean mask) instead of at every position (the saving grows with the unsupervised share: image tokens, and
    the prompt without a prompt loss). Used by every engine and by the step-overhead benchmark's hand-written loop.
    Padded and packed batches alike (training/packing.py): the means over the same label tokens, so the same loss
    and gradients."""
    logits, ids, is_target = [], [], []
    for part in forward_passes(batch):  # one, unless packed rows were planned in several (training/packing.py)
        inputs, tokens = model_layout(model, part)  # packed rows: one padding-free row for FlashAttention
        targets = tokens["labels"][:, 1:]  # position t predicts token t+1
        prompts = tokens["prompt_labels"][:, 1:] if prompt_weight > 0 and "prompt_labels" in tokens else None
        has_target = targets != IGNORE_INDEX
        has_prompt = prompts != IGNORE_INDEX if prompts is not None else torch.zeros_like(has_target)
        keep = torch.zeros_like(tokens["labels"], dtype=torch.bool)
        keep[:, :-1] = has_target | has_prompt
        logits.append(model(**inputs, logits_to_keep=keep).logits.float())  # (label tokens, vocab), position order
        is_target.append(has_target[keep[:, :-1]])  # (label tokens,)
        ids.append(torch.where(has_target, targets, prompts if prompts is not None else targets)[keep[:, :-1]])
    logits, ids, is_target = (torch.cat(t) if len(t) > 1 else t[0] for t in (logits, ids, is_target))
    per_token = torch.nn.functional.cross_entropy(logits, ids, reduction="none")
    # a micro-batch with no label of a part (prompts that fill max_seq_len): that part adds no signal, not NaN
    loss = per_token[is_target].mean() if bool(is_target.any()) else per_token.sum() * 0.0
    if prompt_weight > 0 and bool((~is_target).any()):
        loss = loss + prompt_weight * per_token[~is_target].mean()
    return loss
