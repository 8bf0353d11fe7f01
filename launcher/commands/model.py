"""`launcher model ...`: base-model tools.

    launcher model convert-llava-med --src models/llava-med-v1.5-mistral-7b \\
        --vision-tower models/clip-vit-large-patch14-336 --out models/llava-med-v1.5-mistral-7b-hf --verify

convert-llava-med turns the original LLaVA-Med v1.5 Mistral-7B download (the LLaVA repository's `llava_mistral`
format, which transformers cannot load) into a `LlavaForConditionalGeneration` directory that
`model.name_or_path` can point at. --verify then runs the original layout and the converted model on one image and
prompt and fails unless their logits agree to --tolerance. The work is in training/convert_llava_med/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("model", help="base-model tools (convert LLaVA-Med to the HF LLaVA format)")
    sub = parser.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser(
        "convert-llava-med",
        help="convert LLaVA-Med v1.5 (llava_mistral) to an HF LlavaForConditionalGeneration directory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--src",
        type=Path,
        required=True,
        help="the original checkpoint dir (config.json with model_type llava_mistral, weights, tokenizer)",
    )
    p.add_argument(
        "--vision-tower",
        type=Path,
        required=True,
        help="local dir of the CLIP model named by the source's mm_vision_tower (openai/clip-vit-large-patch14-336)",
    )
    p.add_argument("--out", type=Path, required=True, help="output dir (written as OUT.partial, renamed when done)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="compare the converted model's logits with the original layout's (needs RAM for one full "
        "model in --verify-dtype at a time: ~30 GB for the 7B in fp32)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed |logit difference| for --verify (default: %(default)s)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .bin weights with torch.load(weights_only=True); without it .bin files are refused",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="storage dtype of the output; auto (default) = the source language model's",
    )
    p.add_argument(
        "--verify-dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="compute dtype of both models during --verify (default: %(default)s)",
    )
    p.add_argument("--verify-device", default="cpu", help="torch device for --verify: cpu (default), cuda, cuda:1, mps")
    p.add_argument(
        "--verify-image",
        type=Path,
        default=None,
        help="image for --verify (default: a fixed synthetic non-square image)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run_convert_llava_med)


def run_convert_llava_med(args: argparse.Namespace) -> int:
    from training.convert_llava_med.convert import convert  # torch + transformers: only when the command runs

    result = convert(
        args.src,
        args.vision_tower,
        args.out,
        allow_pickle=args.allow_pickle,
        dtype=args.dtype,
        overwrite=args.overwrite,
        verify=args.verify,
        tolerance=args.tolerance,
        verify_dtype=args.verify_dtype,
        verify_device=args.verify_device,
        verify_image=args.verify_image,
    )
    summary = {
        "out": str(result.out),
        "shards": result.shards,
        "gigabytes": round(result.total_bytes / 1e9, 3),
        "dtype": result.dtype,
        "vocab_size": result.vocab_size,
        "image_token_id": result.image_token_id,
        "pad_token_id": result.pad_token_id,
        "verified_max_abs_logit_diff": result.verify["max_abs_diff"] if result.verify else None,
    }
    print(json.dumps(summary))
    print(f"done: set model.name_or_path={result.out} to train on it")
    return 0
