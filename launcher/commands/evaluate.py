"""`launcher evaluate`, `launcher register`, `launcher predict`: score a model, put it in the registry, use it.

    launcher evaluate --checkpoint runs/tiny/checkpoints/final --data data/synth/curriculum_val.jsonl \\
        --data-root data/synth --ehr both --out runs/tiny/eval            (metrics.json, report.md, plots/, MLflow run)
    launcher evaluate --checkpoint runs/tiny/checkpoints/final \\
        --baseline-checkpoint runs/image_only/checkpoints/final \\
        --data data/synth/curriculum_val.jsonl --data-root data/synth --out runs/tiny/eval-vs-image-only
    launcher evaluate --model models:/cxr-report-generator@candidate --tracking-uri sqlite:///runs/tiny/mlflow.db \\
        --data data/synth/curriculum_val.jsonl --data-root data/synth --out runs/tiny/eval-registered
    launcher register --checkpoint runs/tiny/checkpoints/final --name cxr-report-generator --alias candidate
    launcher predict --checkpoint runs/tiny/checkpoints/final --image x.jpg --ehr ehr.json --format json
    launcher predict --model models:/cxr-report-generator@candidate --tracking-uri URI --image x.jpg
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    e = sub.add_parser(
        "evaluate",
        help="generate reports and score them (metrics, the EHR A/B test, report.md)",
        description=_doc_of("training.evaluation"),
        formatter_class=fmt,
    )
    _model_source(e)
    e.add_argument("--data", required=True, metavar="FILE", help="curriculum JSONL to evaluate on (e.g. the val file)")
    e.add_argument(
        "--data-root", metavar="DIR", help="directory image paths are relative to (default: the data file's directory)"
    )
    e.add_argument(
        "--ehr",
        choices=["on", "off", "both"],
        default="both",
        help="Stage B arms: EHR on, EHR off (Patient Data emptied), or both with the paired A/B test "
        "(default: %(default)s); the Stage A prompt arm always runs",
    )
    e.add_argument(
        "--baseline-checkpoint",
        default=None,
        metavar="DIR2",
        help="a separately trained model (e.g. image-only, curriculum.stage_split=1.0, same steps) "
        "evaluated on the same studies and arms, with the same paired tests",
    )
    e.add_argument(
        "--limit", type=int, default=None, metavar="N", help="a seeded random sample of N studies (seed: --seed)"
    )
    e.add_argument("--batch-size", type=int, default=16, metavar="B", help="generation batch (default: %(default)s)")
    e.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="generation length, the same for every arm and model (default: the smallest "
        "data.max_seq_len minus the longest prompt of any arm)",
    )
    e.add_argument(
        "--save-predictions",
        action="store_true",
        help="also write predictions.jsonl (holds patient data: generated text per study)",
    )
    e.add_argument("--seed", type=int, default=0, help="seed of torch and of the bootstrap / permutations")
    e.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples and permutations per metric (default: %(default)s)",
    )
    e.add_argument("--out", required=True, metavar="DIR", help="output directory")
    e.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    for flag, what in (
        ("--chexbert", "CheXbert labeler (chexbert.pth + bert-base-uncased config/vocab)"),
        ("--radgraph", "RadGraph (DIR/radgraph/: the extracted radgraph.tar.gz)"),
        ("--bertscore-model", "BERTScore model (a transformers model directory)"),
    ):
        e.add_argument(
            flag,
            default=None,
            metavar="DIR",
            help=f"local weights of the {what}; without it the metric is skipped (README: Evaluation)",
        )
    e.add_argument(
        "--no-stage-a-end",
        action="store_true",
        help="do not evaluate the sibling stage_A_end/ checkpoint beside the model",
    )
    e.add_argument("--no-mlflow", action="store_true", help="write the files only; log no MLflow run")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=run_evaluate)

    r = sub.add_parser(
        "register",
        help="log a checkpoint as an MLflow pyfunc model and register a version",
        description=_doc_of("training.registry"),
        formatter_class=fmt,
    )
    r.add_argument("--checkpoint", required=True, metavar="DIR", help="adapter bundle directory")
    r.add_argument("--name", required=True, help="registered model name")
    r.add_argument("--alias", default=None, help="alias to point at the new version (e.g. candidate)")
    r.add_argument(
        "--tracking-uri",
        default=None,
        metavar="URI",
        help="MLflow store (default: the checkpoint config's, i.e. the training run's)",
    )
    r.set_defaults(func=run_register)

    p = sub.add_parser(
        "predict",
        help="generate one report for an image (and optional EHR JSON)",
        description=__doc__,
        formatter_class=fmt,
    )
    _model_source(p)
    p.add_argument("--image", required=True, metavar="FILE", help="JPEG/PNG chest X-ray")
    p.add_argument(
        "--ehr",
        default=None,
        metavar="FILE",
        help="Patient Data as a JSON object file (without it: the Stage A, image-only prompt)",
    )
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.set_defaults(func=run_predict)


def _model_source(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", metavar="DIR", help="adapter bundle directory (e.g. runs/tiny/checkpoints/final)")
    g.add_argument("--model", metavar="URI", help="registered model, e.g. models:/cxr-report-generator@candidate")
    p.add_argument(
        "--tracking-uri",
        default=None,
        metavar="URI",
        help="MLflow store for --model and for the evaluation run (default: the checkpoint's, else "
        "$MLFLOW_TRACKING_URI)",
    )


def _doc_of(module: str) -> str:
    """A module's docstring without importing its heavy dependencies (so `--help` stays instant)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    try:
        with open(spec.origin) as f:  # type: ignore[union-attr]
            return ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, AttributeError):
        return ""


def run_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.evaluation import EvalOptions, run_evaluation, summary_lines

    opts = EvalOptions(
        data=args.data,
        data_root=args.data_root or str(Path(args.data).parent),
        out=args.out,
        checkpoint=args.checkpoint,
        model_uri=args.model,
        baseline_checkpoint=args.baseline_checkpoint,
        ehr=args.ehr,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        save_predictions=args.save_predictions,
        seed=args.seed,
        n_resamples=args.bootstrap,
        device=args.device,
        compare_stage_a_end=not args.no_stage_a_end,
        tracking_uri=args.tracking_uri,
        mlflow=not args.no_mlflow,
        progress=not args.no_progress,
        chexbert=args.chexbert,
        radgraph=args.radgraph,
        bertscore_model=args.bertscore_model,
    )
    result = run_evaluation(opts)
    print("\n".join(summary_lines(result)))
    print(
        f"  wrote {args.out}/metrics.json, {args.out}/report.md, {args.out}/plots/"
        + (f", {args.out}/predictions.jsonl" if args.save_predictions else "")
    )
    if result.get("mlflow_run_id"):
        print(f"  MLflow run {result['mlflow_run_id']}")
    return 0


def run_register(args: argparse.Namespace) -> int:
    from training.registry import register_checkpoint

    info = register_checkpoint(args.checkpoint, args.name, alias=args.alias, tracking_uri=args.tracking_uri)
    print(json.dumps(info, indent=2))
    print(
        f"load it with: mlflow.pyfunc.load_model('models:/{info['name']}"
        + (f"@{info['alias']}" if info["alias"] else f"/{info['version']}")
        + "')",
        file=sys.stderr,
    )
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from datasets_io.errors import LauncherError

    image = Path(args.image)
    if not image.is_file():
        raise LauncherError(f"--image {args.image}: file not found")
    ehr = None
    if args.ehr:
        try:
            ehr = json.loads(Path(args.ehr).read_text())
        except FileNotFoundError:
            raise LauncherError(f"--ehr {args.ehr}: file not found") from None
        except json.JSONDecodeError as e:
            raise LauncherError(f"--ehr {args.ehr}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(ehr, dict):
            raise LauncherError(f"--ehr {args.ehr}: expected a JSON object (the Patient Data block)")
    result = predict_one(args, image.read_bytes(), ehr)
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(result["report"])
        print()
        print(f"valid: {result['valid']}" + (f" ({'; '.join(result['problems'])})" if result["problems"] else ""))
        positive = [k for k, v in (result["chexpert"] or {}).items() if v in ("Positive", "Uncertain")]
        print(
            "CheXpert positive/uncertain: " + (", ".join(f"{k} ({result['chexpert'][k]})" for k in positive) or "none")
        )
        if ehr is not None:
            flags = [k for k, v in (result["icd"] or {}).items() if v]
            print("ICD flags: " + (", ".join(flags) or "none"))
    return 0


def predict_one(args: argparse.Namespace, image: bytes, ehr: dict | None) -> dict:
    """Through the registered pyfunc (--model) or straight from a checkpoint: the same generation code."""
    if args.model:
        import base64

        import pandas as pd

        from training.devices import resolve_device
        from training.registry import load_registered_bundle
        from training.tracking import pyfunc_predict

        bundle, info = load_registered_bundle(args.model, args.tracking_uri)
        bundle.model.to(resolve_device(args.device))
        # The file is read here and sent as bytes, as a REST client would: the served model reads no paths.
        frame = pd.DataFrame(
            {"image": [base64.b64encode(image).decode()], "ehr": [json.dumps(ehr) if ehr is not None else None]}
        )
        # The model's bounds (training.pyfunc.ServingLimits) refusing the request: a user error naming the inputs.
        row = pyfunc_predict(
            info["pyfunc"], frame, {"max_new_tokens": args.max_new_tokens or 0}, f"--image {args.image} / --ehr"
        ).iloc[0]
        decode = lambda v: json.loads(v) if isinstance(v, str) else None  # noqa: E731
        return {
            "report": row["report"],
            "valid": bool(row["valid"]),
            "problems": json.loads(row["problems"]),
            "impression": row["impression"],
            "chexpert": decode(row["chexpert"]),
            "icd": decode(row["icd"]),
        }

    from pathlib import Path

    from datasets_io.config import load_config
    from training.devices import resolve_device
    from training.generate import predict_reports
    from training.model import load_trained

    bundle = load_trained(args.checkpoint)
    bundle.model.to(resolve_device(args.device))
    cfg_file = Path(args.checkpoint) / "config.yaml"
    max_seq_len = load_config(cfg_file).data.max_seq_len if cfg_file.is_file() else None
    return predict_reports(bundle, [(image, ehr)], max_seq_len=max_seq_len, max_new_tokens=args.max_new_tokens)[0]
