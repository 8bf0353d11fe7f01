"""Serving the registered model safely: the input bounds and the no-paths rule (fast, in process), and a real
`mlflow models serve` process answering good and bad requests over HTTP (slow).

    pytest -q tests/test_serving.py -m "not slow"      # the parsing and bounds functions
    pytest -q tests/test_serving.py                     # + the served model (~25 s server start, after a tiny run)
"""

from __future__ import annotations

import base64
import builtins
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from conftest import free_ports
from test_evaluate import REGISTERED_ALIAS, REGISTERED_NAME, tiny_trained_run
from training.pyfunc import (
    InputError,
    ServingLimits,
    check_image_header,
    ehr_value,
    generation_params,
    image_bytes,
    json_depth,
    requests_from_frame,
)

NO_PATHS = "the served model does not read file paths"


# --------------------------------------------------------------------------------------------- test images
def png_of_size(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, written chunk by chunk: a 20000x20000 one (400 M pixels, 50 MB of
    rows) compresses to ~50 kB and never exists uncompressed, here or in Pillow."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * min(1000, height - y)) for y in range(0, height, 1000)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encoded(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------------------------- fast
def test_paths_are_refused_without_touching_the_file_system(tmp_path, monkeypatch):
    real = tmp_path / "xray.jpg"
    real.write_bytes(encoded("JPEG"))
    touched = []

    def forbidden(*args, **kwargs):
        touched.append(args[:1])
        raise AssertionError("the file system was touched")

    for target, name in (
        (builtins, "open"),
        (os, "stat"),
        (os, "open"),
        (Path, "read_bytes"),
        (Path, "is_file"),
        (Path, "exists"),
        (Path, "open"),
    ):
        monkeypatch.setattr(target, name, forbidden)
    answers = []
    for value in (str(real), str(tmp_path / "missing.jpg"), "/etc/passwd", "file:///etc/passwd", "~/x.png"):
        with pytest.raises(InputError) as e:
            image_bytes(value, ServingLimits())
        answers.append(str(e.value))
    monkeypatch.undo()
    assert not touched
    assert len(set(answers)) == 1 and NO_PATHS in answers[0]  # an existing file and a missing one: the same answer
    assert str(tmp_path) not in answers[0]
    # In process, asked for explicitly: the path is read.
    assert image_bytes(str(real), ServingLimits(allow_local_paths=True)) == real.read_bytes()
    with pytest.raises(InputError, match=NO_PATHS):  # a missing file is still not valid base64
        image_bytes(str(tmp_path / "missing.jpg"), ServingLimits(allow_local_paths=True))


def test_image_size_is_bounded_before_decoding():
    limits = ServingLimits(max_image_bytes=1000)
    assert image_bytes(b64(b"x" * 1000), limits) == b"x" * 1000 and image_bytes(b"raw", limits) == b"raw"
    with pytest.raises(InputError, match=r"`image` has 1468 base64 characters, more than max_image_bytes=1000"):
        image_bytes(b64(b"x" * 1100), limits)  # refused by its length, before b64decode
    with pytest.raises(InputError, match=r"`image` is 1001 bytes, more than max_image_bytes=1000"):
        image_bytes(b64(b"x" * 1001), limits)
    with pytest.raises(InputError, match=r"`image` is 1001 bytes"):
        image_bytes(b"x" * 1001, limits)
    for missing in (None, "", float("nan")):
        with pytest.raises(InputError, match="`image` is missing"):
            image_bytes(missing, limits)
    with pytest.raises(InputError, match="`image` must be a base64 string, got int"):
        image_bytes(5, limits)


def test_image_header_format_and_pixel_bounds(monkeypatch):
    limits = ServingLimits(max_image_pixels=5000 * 5000)
    assert check_image_header(encoded("JPEG", (3056, 2544)), limits) == ("JPEG", 3056, 2544)  # a MIMIC image
    assert check_image_header(png_of_size(5000, 5000), limits) == ("PNG", 5000, 5000)
    with pytest.raises(InputError, match=r"6000x5000 = 30000000 pixels, more than max_image_pixels=25000000"):
        check_image_header(png_of_size(6000, 5000), limits)
    # Over Pillow's own bomb limit (~179 M pixels): Image.open refuses it; the same answer, no decoded pixels.
    with pytest.raises(InputError, match=r"more than max_image_pixels=25000000 pixels"):
        check_image_header(png_of_size(20000, 20000), limits)
    for other in (encoded("GIF"), encoded("BMP"), encoded("TIFF"), b"%PDF-1.4 not an image", b"\x89PNG\r\n\x1a\n"):
        with pytest.raises(InputError, match="`image` is not a JPEG or PNG image"):
            check_image_header(other, limits)
    # Nothing decodes before the size check: Image.load (what decoding runs) is never called.
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(InputError, match="pixels"):
        check_image_header(png_of_size(6000, 5000), limits)


def test_ehr_bounds():
    limits = ServingLimits(max_ehr_chars=200, max_ehr_depth=4)
    assert all(ehr_value(none, limits) is None for none in (None, float("nan"), " "))
    ok = {"Age": 70, "Labs": {"BNP": {"value": 1.0, "reference_range": [0, 100]}}}  # the Patient Data block: 4 deep
    assert ehr_value(json.dumps(ok), limits) == ok and ehr_value("{}", limits) == {}
    assert json_depth(ok) == 4 and json_depth(1) == 0 and json_depth([]) == 1
    cases = {
        '{"Age": 70,': r"`ehr` is not valid JSON \(Expecting property name enclosed in double quotes at character 11\)",
        "[1]": "`ehr` must be a JSON object, got list",
        json.dumps({"a": "x" * 200}): "`ehr` has 209 characters, more than max_ehr_chars=200",
        json.dumps({"a": {"b": {"c": {"d": [1]}}}}): "`ehr` is nested 5 deep, more than max_ehr_depth=4",
    }
    for value, reason in cases.items():
        with pytest.raises(InputError, match=reason):
            ehr_value(value, limits)
    with pytest.raises(InputError, match="must be a JSON object string, got int"):
        ehr_value(3, limits)
    # Deeper than Python's recursion limit, within the length bound: a 400, not a RecursionError (a 500).
    with pytest.raises(InputError, match="nested deeper than max_ehr_depth=8"):
        ehr_value("[" * 100_000, ServingLimits(max_ehr_chars=100_000))


def test_a_bad_row_fails_the_request_naming_every_bad_row():
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

    from datasets_io.images import ImageSpec, preprocess_image

    good = b64(encoded("JPEG"))
    limits = ServingLimits(max_rows=4, max_ehr_depth=4)
    spec = ImageSpec(size=32)
    decode = lambda data: preprocess_image(data, spec)  # noqa: E731
    parsed = requests_from_frame(pd.DataFrame({"image": [good, good], "ehr": ['{"Age": 70}', None]}), limits, decode)
    assert [p[0].shape for p in parsed] == [(3, 32, 32)] * 2 and [p[1] for p in parsed] == [{"Age": 70}, None]

    noise = io.BytesIO()
    Image.effect_noise((300, 300), 60).save(noise, format="PNG")
    truncated = noise.getvalue()[:2000]  # the header passes, the pixel data does not decode
    frame = pd.DataFrame(
        {"image": [good, b64(b"GIF89a...."), good, b64(truncated)], "ehr": [None, "[1]", "{bad", None]}
    )
    with pytest.raises(MlflowException) as e:
        requests_from_frame(frame, limits, decode)
    assert e.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE) and e.value.get_http_status_code() == 400
    msg = e.value.message
    assert msg.startswith(
        "3 of 4 rows rejected, nothing was generated: row 1: `image` is not a JPEG or PNG image, "
        "`ehr` must be a JSON object, got list; row 2: `ehr` is not valid JSON"
    )  # both columns
    assert "row 3: `image` is a PNG whose data does not decode" in msg and "row 0" not in msg
    assert "Traceback" not in msg and "/" not in msg.replace("JPEG or PNG", "")

    with pytest.raises(MlflowException, match="the request has 5 rows, more than max_rows=4"):
        requests_from_frame(pd.DataFrame({"image": [good] * 5}), limits)
    with pytest.raises(MlflowException, match="`image` column"):
        requests_from_frame(pd.DataFrame({"picture": [good]}), limits)
    many = pd.DataFrame({"image": ["not base64!"] * 30})
    with pytest.raises(MlflowException, match="; and 10 more bad rows$"):
        requests_from_frame(many, ServingLimits(max_rows=30))


def test_params_and_limits_config(monkeypatch):
    from training.pyfunc import ReportGenerator

    limits = ServingLimits(max_rows=4, max_new_tokens=100)
    assert generation_params(None, limits, 4) == (None, 4)
    assert generation_params({"max_new_tokens": 100, "batch_size": 2}, limits, 4) == (100, 2)
    assert generation_params({"batch_size": 8}, limits, 4) == (None, 8)  # the signature's default, > max_rows
    for params, reason in (
        ({"max_new_tokens": 101}, "max_new_tokens=101: expected 0"),
        ({"max_new_tokens": -1}, "max_new_tokens=-1"),
        ({"batch_size": -2}, "batch_size=-2: expected an integer >= 1"),
    ):
        with pytest.raises(MlflowException, match=reason):
            generation_params(params, limits, 4)

    assert ServingLimits.from_model_config({"max_rows": 3, "batch_size": 8, "base_model": "x"}).max_rows == 3
    for bad in ({"max_rows": 0}, {"max_rows": "3"}, {"max_rows": True}, {"allow_local_paths": "yes"}):
        with pytest.raises(ValueError, match=f"model_config {next(iter(bad))}"):
            ServingLimits.from_model_config(bad)
    assert set(ServingLimits().as_model_config()) == {
        "max_rows",
        "max_image_bytes",
        "max_image_pixels",
        "max_ehr_chars",
        "max_ehr_depth",
        "max_new_tokens",
        "allow_local_paths",
    }

    model = ReportGenerator.__new__(ReportGenerator)  # no weights needed for the limits
    model.limits = ServingLimits(allow_local_paths=True)
    assert model.request_limits().allow_local_paths
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")  # what MLflow's scoring server sets
    assert not model.request_limits().allow_local_paths


def test_an_internal_failure_is_a_500_without_its_stack_in_the_server(monkeypatch, caplog):
    from training.pyfunc import ReportGenerator

    model = ReportGenerator.__new__(ReportGenerator)
    model.limits, model.default_batch_size, model.bundle = ServingLimits(), 8, None  # generation will fail
    frame = pd.DataFrame({"image": [b64(encoded("PNG"))]})
    with pytest.raises(AttributeError):  # in process: the real error
        model.predict(None, frame)
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    with pytest.raises(MlflowException) as e:
        model.predict(None, frame)
    assert e.value.get_http_status_code() == 500 and "AttributeError" not in e.value.message
    assert e.value.__cause__ is None and e.value.__suppress_context__ and not e.value.json_kwargs  # no stack_trace
    assert "AttributeError" in caplog.text  # ... which goes to the server's log


def test_register_refuses_unknown_serving_limits(tmp_path):
    from datasets_io.errors import LauncherError
    from training.registry import register_checkpoint

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(LauncherError, match=r"serving_limits: unknown keys \['max_images'\]"):
        register_checkpoint(tmp_path, "m", serving_limits={"max_images": 3})


# --------------------------------------------------------------------------------------------- slow: a real server
SERVER_CONFIG = {"max_rows": 3, "max_image_bytes": 300_000, "allow_local_paths": True}


@pytest.fixture(scope="module")
def served(synth_dir, tmp_path_factory):
    """`mlflow models serve` of the registered tiny model, with limits set the way an operator would
    (MLFLOW_PYFUNC_INFERENCE_CONFIG), including allow_local_paths, which the served model must ignore. It forks
    uvicorn workers: started in its own session, stopped by process group."""
    run = tiny_trained_run(synth_dir, tmp_path_factory)
    port = free_ports(1)[0]
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{run / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps(SERVER_CONFIG),
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("PYTHONPATH", None)  # the model's own code (code_paths) is what serves
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # it execs `uvicorn` by name
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "models",
                "serve",
                "-m",
                f"models:/{REGISTERED_NAME}@{REGISTERED_ALIAS}",
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=tmp_path_factory.mktemp("cwd"),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, "mlflow models serve exited:\n" + log_path.read_text()[-3000:]
            assert time.time() < deadline, "no /ping answer:\n" + log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield {"url": url, "log": log_path}
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (mlflow + uvicorn and its workers), SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def invoke(served: dict, records: list[dict], params: dict | None = None) -> tuple[int, dict]:
    body = json.dumps({"dataframe_records": records, "params": {"max_new_tokens": 4, **(params or {})}}).encode()
    req = urllib.request.Request(
        served["url"] + "/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def model_error(answer: dict) -> str:
    """Our part of an error answer (MLflow's server puts "Failed to predict data '<the frame's repr>'.\\nError: "
    before it)."""
    assert set(answer) <= {"error_code", "message", "error_class", "sqlstate"}, answer  # no "stack_trace"
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    return answer["message"].split("\nError: ", 1)[1]


def synth_image(synth_dir: Path) -> Path:
    return next(synth_dir.rglob("*.jpg"))


@pytest.mark.slow
def test_served_model_answers_a_base64_image(served, synth_dir):
    image = b64(synth_image(synth_dir).read_bytes())
    status, answer = invoke(served, [{"image": image, "ehr": json.dumps({"Age": 70, "Sex": "F"})}, {"image": image}])
    assert status == 200, answer
    rows = answer["predictions"]
    assert len(rows) == 2 and set(rows[0]) == {"report", "valid", "problems", "impression", "chexpert", "icd"}
    assert isinstance(rows[0]["report"], str) and rows[1]["icd"] is None  # no EHR: the Stage A prompt


@pytest.mark.slow
def test_served_model_refuses_paths_even_when_configured_to_read_them(served, synth_dir, tmp_path):
    real = synth_image(synth_dir)
    errors = []
    for path in (real, tmp_path / "does-not-exist.jpg"):
        status, answer = invoke(served, [{"image": str(path)}])
        assert status == 400, answer
        errors.append(model_error(answer))
    assert (
        errors[0] == errors[1] == f"1 of 1 rows rejected, nothing was generated: row 0: `image` is not valid "
        f"base64; {NO_PATHS}, send the image bytes base64-encoded"
    )


@pytest.mark.slow
def test_served_model_bad_inputs_are_400s_naming_row_and_reason(served, synth_dir):
    good = b64(synth_image(synth_dir).read_bytes())
    cases = [
        (
            [{"image": good}, {"image": b64(b"\xff\xd8" + b"\0" * 300_001)}],
            "row 1: `image` is 300003 bytes, more than max_image_bytes=300000",
        ),
        ([{"image": b64(png_of_size(20000, 20000))}], "row 0: `image` has more than max_image_pixels=25000000 pixels"),
        ([{"image": b64(png_of_size(6000, 5000))}], "row 0: `image` is 6000x5000 = 30000000 pixels"),
        (
            [{"image": good}, {"image": good}, {"image": b64(b"just some text, not an image")}],
            "row 2: `image` is not a JPEG or PNG image",
        ),
        ([{"image": good, "ehr": '{"Age": 70,'}], "row 0: `ehr` is not valid JSON"),
        ([{"image": good, "ehr": "[" * 5000}], "row 0: `ehr` is nested deeper than max_ehr_depth=8"),
        ([{"image": good}] * 4, "the request has 4 rows, more than max_rows=3"),
    ]
    for records, reason in cases:
        status, answer = invoke(served, records)
        assert status == 400, (reason, answer)
        error = model_error(answer)
        assert reason in error, (reason, error)
        assert "Traceback" not in answer["message"] and "site-packages" not in answer["message"]
    status, answer = invoke(served, [{"image": good}], params={"max_new_tokens": 100_000})
    assert status == 400 and "max_new_tokens=100000: expected 0 (the default) to 1024" in model_error(answer)

    status, answer = invoke(served, [{"image": good}])  # still serving
    assert status == 200 and len(answer["predictions"]) == 1
