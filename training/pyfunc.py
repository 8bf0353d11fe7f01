"""The MLflow pyfunc wrapper of an adapter bundle: what the Model Registry serves.

    model = mlflow.pyfunc.load_model("models:/cxr-report-generator@candidate")
    model.predict(pd.DataFrame({"image": [base64.b64encode(jpeg).decode()], "ehr": ['{"Age": 71, "Labs": {...}}']}))

    mlflow models serve -m models:/cxr-report-generator@candidate --env-manager local --host 127.0.0.1 --port 5055

Input, a DataFrame with
- `image`: the JPEG/PNG bytes base64-encoded (a string; what REST clients send), or raw bytes (in-process). A local
  file path only when the model was loaded with `model_config={"allow_local_paths": True}`, and never inside
  MLflow's scoring server: a REST client must not make the server read (or probe for) its files;
- `ehr` (optional): the Patient Data as a JSON object string. Missing / null / empty: the Stage A prompt (image
  only: Impression and CheXpert, no ICD). `"{}"`: the Stage B prompt with the Patient Data block emptied.
Output, one row per input: `report` (the generated text), `valid` (it parses), `problems` (JSON list),
`impression`, `chexpert` (JSON object), `icd` (JSON object of flags; null without EHR). Params: `max_new_tokens`
(0 = the checkpoint's data.max_seq_len minus the prompt), `batch_size`.

Bounds (ServingLimits, in the model_config): rows per request, encoded image size, pixels read from the image
header before decoding, JPEG/PNG only, EHR length and nesting, max_new_tokens. Every row is checked before anything
is generated; a bad row fails the whole request with an MlflowException(INVALID_PARAMETER_VALUE), which MLflow's
server answers as HTTP 400, naming each bad row by number and reason.

Artifacts (training/registry.py logs them): `adapter` (the bundle: adapter weights, tokenizer, config.yaml,
trainer_state.json) and `base_model` when the base is a local directory (the tiny model); a hub base is referenced
by id in the model config instead. The project packages ship as the model's code, so a fresh process loads it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import mlflow.pyfunc
import pandas as pd

INPUT_COLUMNS = ("image", "ehr")
OUTPUT_COLUMNS = ("report", "valid", "problems", "impression", "chexpert", "icd")
IMAGE_FORMATS = ("JPEG", "PNG")  # what chest X-rays come as; Pillow is asked to try no other decoder
MAX_LISTED_ROWS = 20  # bad rows named one by one in an error answer
logger = logging.getLogger(__name__)


def signature() -> Any:
    """Strings in, strings (and a validity flag) out; params for generation length and batch size."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "ehr", required=False)])
    outputs = Schema(
        [
            ColSpec("string", "report"),
            ColSpec("boolean", "valid"),
            ColSpec("string", "problems"),
            ColSpec("string", "impression", required=False),
            ColSpec("string", "chexpert", required=False),
            ColSpec("string", "icd", required=False),
        ]
    )
    params = ParamSchema([ParamSpec("max_new_tokens", "long", 0), ParamSpec("batch_size", "long", 8)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


class InputError(ValueError):
    """What is wrong with one value of one row, said without internals (no stack, no server path)."""


@dataclass(frozen=True)
class ServingLimits:
    """What one request may hold. Every key is logged in the model's model_config (training/registry.py), so it can
    be changed at load time (`mlflow.pyfunc.load_model(uri, model_config={...})`) or when serving
    (`MLFLOW_PYFUNC_INFERENCE_CONFIG='{"max_rows": 32}' mlflow models serve ...`): MLflow only lets a load override
    keys the logged model_config already has. The defaults fit MIMIC-CXR (3056x2544 JPEGs of ~1-4 MB)."""

    max_rows: int = 16
    """Rows (studies) per request; more is refused whole (so no request is more than one max_rows batch)."""
    max_image_bytes: int = 40_000_000
    """Size of one encoded image file (the decoded base64), bytes. A base64 string longer than 4/3 of it is refused
    before it is decoded."""
    max_image_pixels: int = 25_000_000
    """Width x height read from the image header before any pixel is decoded: ~3x a MIMIC image, 5000x5000."""
    max_ehr_chars: int = 32_768
    """Length of one `ehr` JSON string (a MIMIC Patient Data block is ~0.5-2 k characters)."""
    max_ehr_depth: int = 8
    """Nesting of the `ehr` JSON (the Patient Data block has 4 levels: object > Labs > BNP > reference_range)."""
    max_new_tokens: int = 1024
    """Largest `max_new_tokens` param a request may ask for (generation time grows with it)."""
    allow_local_paths: bool = False
    """Read `image` values that name a file on this machine. For in-process use only (a notebook,
    `mlflow.pyfunc.load_model(uri, model_config={"allow_local_paths": True})`); MLflow's scoring server never reads
    paths, whatever this says (see `in_scoring_server`)."""

    @classmethod
    def from_model_config(cls, config: dict[str, Any]) -> "ServingLimits":
        """The limits in a model_config (other keys ignored); a wrong type or a value < 1 is a load-time error."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in config or config[f.name] is None:
                continue
            value = config[f.name]
            if isinstance(f.default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"model_config {f.name}: expected true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model_config {f.name}: expected an integer >= 1, got {value!r}")
            values[f.name] = value
        return cls(**values)

    def as_model_config(self) -> dict[str, Any]:
        return asdict(self)


def in_scoring_server() -> bool:
    """True inside MLflow's scoring server (`mlflow models serve`): its init() sets this variable in the process
    that answers /invocations. Local paths are refused there even when `allow_local_paths` was configured."""
    return os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").lower() == "true"


def image_bytes(value: Any, limits: ServingLimits) -> bytes:
    """Raw bytes, or base64 of them; a path to an image file only with `limits.allow_local_paths`. Without it no
    string is ever looked up on the file system, so an answer cannot tell whether a path exists."""
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        raise InputError("`image` is missing: send the image bytes base64-encoded")
    elif not isinstance(value, str):
        raise InputError(f"`image` must be a base64 string, got {type(value).__name__}")
    elif limits.allow_local_paths and len(value) < 4096 and Path(value).is_file():
        data = Path(value).read_bytes()
    else:
        if len(value) > math.ceil(limits.max_image_bytes / 3) * 4 + 4:
            raise InputError(
                f"`image` has {len(value)} base64 characters, more than max_image_bytes="
                f"{limits.max_image_bytes} bytes encode to"
            )
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(
                "`image` is not valid base64; the served model does not read file paths, send the "
                "image bytes base64-encoded"
            ) from None
    if len(data) > limits.max_image_bytes:
        raise InputError(f"`image` is {len(data)} bytes, more than max_image_bytes={limits.max_image_bytes}")
    return data


def check_image_header(data: bytes, limits: ServingLimits) -> tuple[str, int, int]:
    """(format, width, height) from the header only: nothing is decoded before the size is known to be in bounds."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below anyway
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                fmt, (width, height) = im.format, im.size
    except Image.DecompressionBombError:
        # Pillow itself refuses > 2x Image.MAX_IMAGE_PIXELS (~179 M) at open, before we see the size.
        raise InputError(f"`image` has more than max_image_pixels={limits.max_image_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(f"`image` is not a {' or '.join(IMAGE_FORMATS)} image") from None
    if width * height > limits.max_image_pixels:
        raise InputError(
            f"`image` is {width}x{height} = {width * height} pixels, more than max_image_pixels="
            f"{limits.max_image_pixels}"
        )
    return fmt, width, height


def decode_checked(data: bytes, fmt: str, decode: Callable[[bytes], Any]) -> Any:
    """Decode an image whose header passed; a body that does not decode (truncated, corrupt) is the row's error."""
    try:
        return decode(data)
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for broken streams
        reason = str(e).splitlines()[0][:120] if str(e) else e.__class__.__name__
        raise InputError(f"`image` is a {fmt} whose data does not decode ({reason})") from None


def json_depth(obj: Any) -> int:
    """Nesting depth: a scalar is 0, `{}` / `[]` 1, `{"a": [1]}` 2. Iterative, so no recursion limit."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        depth = max(depth, level)
        stack += [(child, level + 1) for child in children]
    return depth


def ehr_value(value: Any, limits: ServingLimits) -> dict | None:
    """None for no EHR (missing, null, NaN, empty string); else the decoded JSON object, within the limits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, dict):
        obj = value
    elif not isinstance(value, str):
        raise InputError(f"`ehr` must be a JSON object string, got {type(value).__name__}")
    elif not value.strip():
        return None
    elif len(value) > limits.max_ehr_chars:
        raise InputError(f"`ehr` has {len(value)} characters, more than max_ehr_chars={limits.max_ehr_chars}")
    else:
        try:
            obj = json.loads(value)
        except json.JSONDecodeError as e:
            raise InputError(f"`ehr` is not valid JSON ({e.msg} at character {e.pos})") from None
        except RecursionError:
            raise InputError(f"`ehr` is nested deeper than max_ehr_depth={limits.max_ehr_depth}") from None
    if not isinstance(obj, dict):
        raise InputError(f"`ehr` must be a JSON object, got {type(obj).__name__}")
    if json_depth(obj) > limits.max_ehr_depth:
        raise InputError(f"`ehr` is nested {json_depth(obj)} deep, more than max_ehr_depth={limits.max_ehr_depth}")
    return obj


def bad_request(message: str) -> Exception:
    """MLflow's scoring server answers an MlflowException with INVALID_PARAMETER_VALUE as HTTP 400 carrying only
    this message (prefixed by MLflow with the request's data); any other exception becomes a 500 with a stack."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def parse_row(
    image: Any, ehr: Any, limits: ServingLimits, decode: Callable[[bytes], Any] | None
) -> tuple[Any, dict | None]:
    """One row -> (image bytes, or what `decode` makes of them; EHR dict or None). Raises InputError with the
    problems of both columns."""
    problems, pixels, patient = [], None, None
    try:
        data = image_bytes(image, limits)
        fmt, _, _ = check_image_header(data, limits)
        pixels = decode_checked(data, fmt, decode) if decode else data
    except InputError as e:
        problems.append(str(e))
    try:
        patient = ehr_value(ehr, limits)
    except InputError as e:
        problems.append(str(e))
    if problems:
        raise InputError(", ".join(problems))
    return pixels, patient


def requests_from_frame(
    frame: Any, limits: ServingLimits | None = None, decode: Callable[[bytes], Any] | None = None
) -> list[tuple[Any, dict | None]]:
    """Every row checked before anything is generated. Any bad row fails the whole request (HTTP 400) with every
    bad row's number and reason (the first MAX_LISTED_ROWS of them, then a count): the answer keeps the output
    schema, and a client never takes a partial answer for a whole one."""
    limits = limits or ServingLimits()
    if isinstance(frame, dict):
        frame = pd.DataFrame(frame)
    if not isinstance(frame, pd.DataFrame) or "image" not in frame.columns:
        raise bad_request("input must be a DataFrame with an `image` column (and optionally `ehr`)")
    if len(frame) > limits.max_rows:
        raise bad_request(
            f"the request has {len(frame)} rows, more than max_rows={limits.max_rows}: split it into smaller requests"
        )
    ehr = frame["ehr"] if "ehr" in frame.columns else [None] * len(frame)
    parsed, problems = [], []
    for i, (image, e) in enumerate(zip(frame["image"], ehr)):
        try:
            parsed.append(parse_row(image, e, limits, decode))
        except InputError as err:
            problems.append(f"row {i}: {err}")
    if problems:
        listed = "; ".join(problems[:MAX_LISTED_ROWS])
        more = f"; and {len(problems) - MAX_LISTED_ROWS} more bad rows" if len(problems) > MAX_LISTED_ROWS else ""
        raise bad_request(f"{len(problems)} of {len(frame)} rows rejected, nothing was generated: {listed}{more}")
    return parsed


def generation_params(params: dict[str, Any] | None, limits: ServingLimits, default_batch_size: int) -> tuple:
    """(max_new_tokens or None for the checkpoint's default, batch_size) from the request's params, bounded."""
    params = params or {}
    max_new = int(params.get("max_new_tokens") or 0)
    batch_size = int(params.get("batch_size") or default_batch_size)
    if not 0 <= max_new <= limits.max_new_tokens:
        raise bad_request(f"param max_new_tokens={max_new}: expected 0 (the default) to {limits.max_new_tokens}")
    if batch_size < 1:  # no upper bound needed: a request holds at most max_rows rows, so it is one batch at most
        raise bad_request(f"param batch_size={batch_size}: expected an integer >= 1")
    return max_new or None, batch_size


def results_frame(results: list[dict]) -> pd.DataFrame:
    """predict_reports' dicts -> the output DataFrame (structured fields as JSON strings)."""
    enc = lambda v: None if v is None else json.dumps(v)  # noqa: E731
    return pd.DataFrame(
        [
            {
                "report": r["report"],
                "valid": bool(r["valid"]),
                "problems": json.dumps(r["problems"]),
                "impression": r["impression"],
                "chexpert": enc(r["chexpert"]),
                "icd": enc(r["icd"]),
            }
            for r in results
        ],
        columns=list(OUTPUT_COLUMNS),
    )


class ReportGenerator(mlflow.pyfunc.PythonModel):
    """Base model + adapter bundle, loaded with training.model.load_trained; greedy generation."""

    def load_context(self, context: Any) -> None:
        from datasets_io.config import load_config
        from training.model import load_trained

        config = dict(context.model_config or {})
        self.limits = ServingLimits.from_model_config(config)  # first: a bad limit fails before the weights load
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

    def request_limits(self) -> ServingLimits:
        """The loaded limits; inside MLflow's scoring server never with local paths."""
        if self.limits.allow_local_paths and in_scoring_server():
            return replace(self.limits, allow_local_paths=False)
        return self.limits

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        # pd.DataFrame hints: MLflow takes the frame as is (the explicit signature() does the validation)
        if not in_scoring_server():
            return self.generate(model_input, params)  # in process: the real exception, with its traceback
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

        try:
            return self.generate(model_input, params)
        except MlflowException:
            raise
        except Exception:  # noqa: BLE001 -- MLflow's server would send this stack (server paths) to the client
            logger.exception("prediction failed on a request that passed the input checks")
            raise MlflowException(
                "the model failed on this request (an internal error; the server log has the details)",
                error_code=INTERNAL_ERROR,
            ) from None

    def generate(self, model_input: pd.DataFrame, params: dict[str, Any] | None) -> pd.DataFrame:
        """Check every row, then generate (training.generate.predict_reports)."""
        from datasets_io.images import preprocess_image
        from training.generate import predict_reports

        limits = self.request_limits()
        max_new, batch_size = generation_params(params, limits, self.default_batch_size)
        spec = self.bundle.image_spec
        # Decoded here, row by row, so a corrupt image is that row's 400 (not a 500 in the middle of generation).
        requests = requests_from_frame(model_input, limits, decode=lambda data: preprocess_image(data, spec))
        if not requests:
            return results_frame([])
        return results_frame(
            predict_reports(
                self.bundle, requests, max_seq_len=self.max_seq_len, max_new_tokens=max_new, batch_size=batch_size
            )
        )


# MLflow loads this file as "models from code" (registry.py passes its path as `python_model`): run under another
# module name, it hands MLflow the model instance. Imported normally (training.pyfunc), it does nothing.
if __name__ not in ("training.pyfunc", "__main__"):
    mlflow.models.set_model(ReportGenerator())
