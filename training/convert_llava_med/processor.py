"""The tokenizer and processor half of the converted directory: `<image>` and `<pad>` added, LLaVA-Med's
`mistral_instruct` chat template, the CLIP image processor (square padding as LLaVA's image_aspect_ratio="pad"), and
the LlavaProcessor tying them."""

from __future__ import annotations

import json
from pathlib import Path

from training.convert_llava_med.source import SourceInfo

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"

# LLaVA-Med v1.5's conversation template `mistral_instruct` (llava/conversation.py): SeparatorStyle.LLAMA_2 with
# system="", sep="", sep2="</s>". A user turn is "[INST] {text} [/INST]", an assistant turn " {text} </s>", the image
# goes first in the user turn as "<image>\n", and a system prompt (empty in LLaVA-Med) is wrapped into the first user
# turn as "<<SYS>>\n{system}\n<</SYS>>\n\n". BOS is written by the template (apply_chat_template(tokenize=True)
# tokenizes with add_special_tokens=False); the original added it through the tokenizer. Content may be a string or the
# transformers list form [{"type": "image"}, {"type": "text", "text": ...}].
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/... (an optional system first)') -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\\n' -%}"
    "{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}"
    "{%- endfor -%}"
    "{%- set text = ns.text -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.index0 == 0 and system -%}{%- set text = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + text -%}"
    "{%- endif -%}"
    "{{- '[INST] ' + text + ' [/INST]' -}}"
    "{%- else -%}{{- ' ' + text + ' ' + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)


def add_llava_tokens(tokenizer) -> tuple[int, int]:
    """Add `<image>` then `<pad>` (the llava-hf order). Returns (image_token_id, pad_token_id).

    `<pad>` replaces whatever pad the source tokenizer names: LLaVA's training script saves pad = `<unk>`, which would
    make padding indistinguishable from a real unknown token.
    """
    from transformers import AddedToken

    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id


def image_processor_for(vision_tower: Path, vision_config, pad_to_square: bool):
    """The tower's CLIP preprocessing (its preprocessor_config.json, else CLIP's constants at the tower's image size) as
    transformers' PIL LLaVA image processor: do_pad=True is LLaVA's image_aspect_ratio="pad" (square with the mean
    colour, then CLIP's resize + centre crop). PIL backend: no torchvision. Returns (processor, note or None)."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    size = vision_config.image_size
    kwargs = dict(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3,  # bicubic
        do_center_crop=True,
        do_convert_rgb=True,
    )
    note = None
    cfg_path = vision_tower / "preprocessor_config.json"
    if cfg_path.is_file():
        tower_cfg = json.loads(cfg_path.read_text())
        for key in ("size", "crop_size", "image_mean", "image_std", "resample", "do_center_crop", "rescale_factor"):
            if key in tower_cfg:
                kwargs[key] = tower_cfg[key]
        if isinstance(kwargs["size"], int):
            kwargs["size"] = {"shortest_edge": kwargs["size"]}
        if isinstance(kwargs["crop_size"], int):
            kwargs["crop_size"] = {"height": kwargs["crop_size"], "width": kwargs["crop_size"]}
    else:
        note = f"{vision_tower} has no preprocessor_config.json: wrote CLIP's mean/std at {size} px"
    return LlavaImageProcessorPil(do_pad=pad_to_square, **kwargs), note


def save_processor(tokenizer, info: SourceInfo, vision_tower: Path, out: Path) -> list[str]:
    """Tokenizer (+ chat template), image processor (preprocessor_config.json) and the LlavaProcessor tying them."""
    from transformers import LlavaProcessor

    notes = []
    image_processor, note = image_processor_for(vision_tower, info.vision_config, info.pad_to_square)
    if note:
        notes.append(note)
    if info.src_config.get("tokenizer_model_max_length"):
        tokenizer.model_max_length = info.src_config["tokenizer_model_max_length"]
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=info.vision_config.patch_size,
        vision_feature_select_strategy=info.select_strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS; "default" drops it again
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)  # tokenizer_config.json with the chat template, for AutoTokenizer alone
    image_processor.save_pretrained(out)  # preprocessor_config.json, for AutoImageProcessor alone
    return notes
