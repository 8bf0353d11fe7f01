"""The MLflow pyfunc wrapper of an adapter bundle: what the Model Registry serves.

    model = mlflow.pyfunc.load_model("models:/cxr-report-generator@candidate")
    model.predict(pd.DataFrame({"image": ["x.jpg"], "ehr": ['{"Age": 71, "Labs": {...}}']}))

Input, a DataFrame with
- `image`: a JPEG/PNG file path, or the image bytes base64-encoded (a string), or raw bytes;
- `ehr` (optional): the Patient Data as a JSON object string. Missing / null / empty: the Stage A prompt (image
  only: Impression and CheXpert, no ICD). `"{}"`: the Stage B prompt with the Patient Data block emptied.
Output, one row per input: `report` (the generated text), `valid` (it parses), `problems` (JSON list),
`impression`, `chexpert` (JSON object), `icd` (JSON object of flags; null without EHR). Params: `max_new_tokens`
(0 = the checkpoint's data.max_seq_len minus the prompt), `batch_size`.

Artifacts (training/registry.py logs them): `adapter` (the bundle: adapter weights, tokenizer, config.yaml,
trainer_state.json) and `base_model` when the base is a local directory (the tiny model); a hub base is referenced
by id in the model config instead. The project packages ship as the model's code, so a fresh process loads it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

INPUT_COLUMNS = ("image", "ehr")
OUTPUT_COLUMNS = ("report", "valid", "problems", "impression", "chexpert", "icd")


def signature() -> Any:
    """Strings in, strings (and a validity flag) out; params for generation length and batch size."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "ehr", required=False)])
    outputs = Schema([ColSpec("string", "report"), ColSpec("boolean", "valid"), ColSpec("string", "problems"),
                      ColSpec("string", "impression", required=False), ColSpec("string", "chexpert", required=False),
                      ColSpec("string", "icd", required=False)])
    params = ParamSchema([ParamSpec("max_new_tokens", "long", 0), ParamSpec("batch_size", "long", 8)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def image_bytes(value: Any, row: int) -> bytes:
    """A path to an image file, base64 of its bytes, or the bytes themselves."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"row {row}: `image` must be a file path or base64-encoded image bytes")
    if len(value) < 4096 and Path(value).is_file():
        return Path(value).read_bytes()
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"row {row}: `image` is neither an existing file nor valid base64") from None


def ehr_value(value: Any, row: int) -> dict | None:
    """None for no EHR (missing, null, NaN, empty string); else the decoded JSON object."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ValueError(f"row {row}: `ehr` must be a JSON object string, got {type(value).__name__}")
    if not value.strip():
        return None
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"row {row}: `ehr` is not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"row {row}: `ehr` must be a JSON object, got {type(obj).__name__}")
    return obj


def requests_from_frame(frame: Any) -> list[tuple[bytes, dict | None]]:
    if isinstance(frame, dict):
        frame = pd.DataFrame(frame)
    if not isinstance(frame, pd.DataFrame) or "image" not in frame.columns:
        raise ValueError("input must be a DataFrame with an `image` column (and optionally `ehr`)")
    ehr = frame["ehr"] if "ehr" in frame.columns else [None] * len(frame)
    return [(image_bytes(im, i), ehr_value(e, i)) for i, (im, e) in enumerate(zip(frame["image"], ehr))]


def results_frame(results: list[dict]) -> pd.DataFrame:
    """predict_reports' dicts -> the output DataFrame (structured fields as JSON strings)."""
    enc = lambda v: None if v is None else json.dumps(v)  # noqa: E731
    return pd.DataFrame([{"report": r["report"], "valid": bool(r["valid"]), "problems": json.dumps(r["problems"]),
                          "impression": r["impression"], "chexpert": enc(r["chexpert"]), "icd": enc(r["icd"])}
                         for r in results], columns=list(OUTPUT_COLUMNS))


class ReportGenerator(mlflow.pyfunc.PythonModel):
    """Base model + adapter bundle, loaded with training.model.load_trained; greedy generation."""

    def load_context(self, context: Any) -> None:
        from launcher.config import load_config
        from training.model import load_trained

        config = dict(context.model_config or {})
        adapter = context.artifacts["adapter"]
        base = context.artifacts.get("base_model") or config.get("base_model")
        if not base:
            raise ValueError("model has neither a `base_model` artifact nor a `base_model` reference in its config")
        self.adapter_dir = adapter
        self.base_model = base
        self.bundle = load_trained(adapter, base_path=base)
        cfg_file = Path(adapter) / "config.yaml"
        self.max_seq_len = load_config(cfg_file).data.max_seq_len if cfg_file.is_file() else None
        self.default_batch_size = int(config.get("batch_size", 8))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        # pd.DataFrame hints: MLflow takes the frame as is (the explicit signature() does the validation)
        from training.generate import predict_reports

        params = params or {}
        max_new = int(params.get("max_new_tokens") or 0) or None
        batch_size = int(params.get("batch_size") or self.default_batch_size)
        requests = requests_from_frame(model_input)
        if not requests:
            return results_frame([])
        return results_frame(predict_reports(self.bundle, requests, max_seq_len=self.max_seq_len,
                                             max_new_tokens=max_new, batch_size=batch_size))


# MLflow loads this file as "models from code" (registry.py passes its path as `python_model`): run under another
# module name, it hands MLflow the model instance. Imported normally (training.pyfunc), it does nothing.
if __name__ not in ("training.pyfunc", "__main__"):
    mlflow.models.set_model(ReportGenerator())
