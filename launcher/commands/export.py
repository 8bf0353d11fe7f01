"""`launcher export`: the trained model out of the project, merged, for vLLM / transformers or llama.cpp / Ollama.

    launcher export --checkpoint runs/tiny/checkpoints/final --format hf --out exports/tiny-hf
    launcher export --model models:/cxr-report-generator@candidate --tracking-uri sqlite:///runs/tiny/mlflow.db \\
        --format hf --out exports/tiny-hf --dtype bf16
    launcher export --checkpoint runs/tiny/checkpoints/final --format gguf --out exports/tiny-gguf --dtype fp16
    vllm serve exports/tiny-hf                       (hf)
    cd exports/tiny-gguf && ollama create cxr -f Modelfile && ollama run cxr      (gguf)

hf: a LlavaForConditionalGeneration directory (LoRA merged, projector in place, processor + chat template); see
training/export.py. gguf: model-F.gguf (the language model, llama.cpp arch "llama"), mmproj-model-F.gguf (CLIP +
projector) and an Ollama Modelfile with the prompt template; see training/export_gguf.py (needs `pip install
.[export]`). OUT is written as OUT.partial and renamed when complete.
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="merge LoRA into the base; write an HF (vLLM) or GGUF (llama.cpp/Ollama) model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="an adapter bundle (checkpoints/final, stage_A_end, ...)")
    src.add_argument("--model", metavar="URI", help="a registered model: models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--tracking-uri", default=None, help="registry of --model (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--format", choices=["hf", "gguf"], required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (written as OUT.partial first)")
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="stored weights: auto = the base model's dtype (default); gguf takes fp32 or fp16",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from training.export import export_hf, load_merged

    if args.format == "gguf":
        from training.export_gguf import export_gguf, require_gguf

        require_gguf()  # before minutes of loading and merging
    merged = load_merged(args.checkpoint, args.model, args.tracking_uri)
    if args.format == "hf":
        summary = export_hf(merged, args.out, args.dtype, args.overwrite)
    else:
        summary = export_gguf(merged, args.out, args.dtype, args.overwrite)
    print(json.dumps(summary))
    return 0
