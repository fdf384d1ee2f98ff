"""User handler scripts (``code/inference.py``, SageMaker's inference-toolkit convention): real
``serve`` processes run as the image runs them, each with a script the test writes; plus the
script checks, discovery and the default decoders in process."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import xgboost as xgb
from serverproc import DEMO, ServerProcess
from test_sagemaker_serve import (  # the image's entry point, as the contract tests run it
    _no_sagemaker_variables_inherited,  # noqa: F401  (an autouse fixture: no SAGEMAKER_* leaks)
    free_port,
    serve_command,
)

from rtbserve import handlers, sagemaker
from rtbserve.config import ModelSettings, discover_models
from rtbserve.errors import ConfigError, InvalidInput, UnsupportedMediaType

SAMPLE = np.genfromtxt(DEMO / "sample.csv", delimiter=",", dtype=np.float32)[:8]
WANT = xgb.Booster(model_file=str(DEMO / "model.json")).inplace_predict(SAMPLE)
N_FEATURES = SAMPLE.shape[1]


def text_rows(rows: np.ndarray, sep: str = ",") -> bytes:
    return "\n".join(sep.join(repr(float(v)) for v in row) for row in rows).encode() + b"\n"


def csv_scores(text: str) -> np.ndarray:
    return np.array([[float(v) for v in line.split(",")] for line in text.split()])


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("handlers-cache")


def model_base(where: Path, scripts: dict[str, str], model_name: str = "model.json") -> Path:
    """``SAGEMAKER_BASE_DIR``: model/ holds the demo model (as ``model_name``) and code/."""
    model_dir = where / "opt-ml" / "model"
    (model_dir / "code").mkdir(parents=True)
    shutil.copy(DEMO / "model.json", model_dir / model_name)
    for name, source in scripts.items():
        (model_dir / "code" / name).write_text(textwrap.dedent(source))
    return where / "opt-ml"


class Served:
    def __init__(self, server: ServerProcess, port: int) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def invoke(self, body: bytes, content_type: str = "text/csv", **headers: str) -> httpx.Response:
        return self.http.post(
            "/invocations", content=body, headers={"content-type": content_type, **headers}
        )


def server_process(base: Path, cache: Path, **variables: str) -> tuple[ServerProcess, int]:
    port = free_port()
    env = {
        "SAGEMAKER_BASE_DIR": str(base),
        "RTBSERVE_CACHE_DIR": str(cache),
        "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "SAGEMAKER_SAFE_PORT_RANGE": f"{port}-{min(port + 15, 65535)}",
        **variables,
    }
    return ServerProcess(command=serve_command("serve"), env=env), port


@pytest.fixture
def serve(tmp_path: Path, cache: Path) -> Iterator[object]:
    """serve(scripts, **env) -> a started server for a model dir with those code/ scripts."""
    started: list[Served] = []

    def _serve(scripts: dict[str, str], model_name: str = "model.json", **env: str) -> Served:
        server, port = server_process(model_base(tmp_path, scripts, model_name), cache, **env)
        served = Served(server.start(), port)
        started.append(served)
        return served

    yield _serve
    for served in started:
        served.http.close()
        assert served.server.stop() == 0


# -- each handler function alone --------------------------------------------------------------

INPUT_FN = """
    import numpy as np
    from rtbserve.errors import InvalidInput

    def input_fn(request_body, request_content_type):
        if request_content_type != "text/x-pipe":
            raise InvalidInput(f"send text/x-pipe, got {request_content_type}")
        text = request_body.decode()  # bytes: not a text type the toolkit decodes
        if text.startswith("boom"):
            raise ValueError("cannot parse boom")
        return [[float(v) for v in line.split("|")] for line in text.splitlines()]
"""


def test_input_fn_parses_a_custom_format_and_its_errors_are_400_or_500(serve) -> None:
    served = serve({"inference.py": INPUT_FN})
    r = served.invoke(text_rows(SAMPLE, "|"), "text/x-pipe")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/csv"  # rtbserve's predict and output_fn
    np.testing.assert_allclose(csv_scores(r.text).ravel(), WANT, atol=1e-5)
    # InvalidInput raised by the script keeps its meaning
    r = served.invoke(text_rows(SAMPLE), "text/csv")
    assert r.status_code == 400 and r.json()["message"] == "send text/x-pipe, got text/csv"
    # rtbserve's predict checks what input_fn returned
    r = served.invoke(b"1|2|3\n", "text/x-pipe")
    assert r.status_code == 400 and f"expected {N_FEATURES} features, got 3" in r.text
    # any other exception: 500 naming the function and the error, no traceback; still serving
    for _ in range(2):
        r = served.invoke(b"boom", "text/x-pipe")
        assert r.status_code == 500
        assert r.json()["type"] == "handler_error"
        assert r.json()["message"] == (
            "handler input_fn in code/inference.py failed: ValueError: cannot parse boom"
        )
        assert "Traceback" not in r.text
        r = served.invoke(text_rows(SAMPLE[:1], "|"), "text/x-pipe")
        assert r.status_code == 200
        np.testing.assert_allclose(float(r.text), WANT[0], atol=1e-5)
    # only input_fn: the model still serves the Open Inference Protocol, with rtbserve's codecs
    r = served.http.post(
        "/v2/models/model/infer",
        json={
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, N_FEATURES],
                    "data": [0.0] * N_FEATURES,
                }
            ]
        },
    )
    assert r.status_code == 200, r.text
    served.server.stop()
    # the traceback was logged once per failed request
    assert served.server.stderr.count("ValueError: cannot parse boom") == 2
    assert served.server.stderr.count("Traceback (most recent call last)") == 2


OUTPUT_FN = """
    import json

    def output_fn(prediction, accept):
        if accept == "text/plain":
            return "scores " + " ".join(f"{float(s):.7f}" for s in prediction)  # body only
        doc = {"scores": [float(s) for s in prediction], "accept": accept, "n": len(prediction)}
        return json.dumps(doc), "application/vnd.scores+json"
"""


def test_output_fn_answers_custom_json_and_gets_the_accept_value(serve) -> None:
    served = serve({"inference.py": OUTPUT_FN})
    r = served.invoke(text_rows(SAMPLE))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/vnd.scores+json"
    doc = r.json()
    assert doc["accept"] == "text/csv"  # no Accept: SageMaker's default Accept
    assert doc["n"] == len(SAMPLE)
    np.testing.assert_allclose(doc["scores"], WANT, atol=1e-5)
    r = served.invoke(text_rows(SAMPLE), accept="application/json")
    assert r.json()["accept"] == "application/json"
    # a body alone answers with the Accept type
    r = served.invoke(text_rows(SAMPLE[:2]), accept="text/plain")
    assert r.headers["content-type"] == "text/plain"
    assert r.text.startswith("scores ")
    np.testing.assert_allclose([float(s) for s in r.text.split()[1:]], WANT[:2], atol=1e-5)


TRANSFORM_FN = """
    import json
    import numpy as np

    def transform_fn(model, request_body, content_type, accept):
        rows = [[float(v) if v else np.nan for v in line.split(",")]
                for line in request_body.splitlines()]
        scores = model.predict(np.array(rows, dtype=np.float32))  # rtbserve's compiled model
        doc = {
            "scores": scores.tolist(),
            "body_type": type(request_body).__name__,
            "content_type": content_type,
            "accept": accept,
        }
        return json.dumps(doc), "application/x-transformed"
"""


def test_transform_fn_alone_gets_rtbserves_model_and_the_text_body(serve) -> None:
    served = serve({"inference.py": TRANSFORM_FN})
    r = served.invoke(text_rows(SAMPLE), "text/csv", accept="application/json")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-transformed"
    doc = r.json()
    assert doc["body_type"] == "str"  # text/csv and application/json arrive decoded
    assert (doc["content_type"], doc["accept"]) == ("text/csv", "application/json")
    np.testing.assert_allclose(doc["scores"], WANT, atol=1e-5)


# -- model_fn + predict_fn, SAGEMAKER_PROGRAM, slow and failing user code ----------------------

HANDLER_PY = """
    import os
    import pathlib
    import time

    import xgboost as xgb

    def model_fn(model_dir):
        return xgb.Booster(model_file=os.path.join(model_dir, "xgboost-model"))

    def predict_fn(data, model):
        first = float(data[0, 0])
        if first == -1.0:  # hold this handler thread until the test releases it
            gate = pathlib.Path(os.environ["HANDLER_TEST_GATE"])
            (gate / "entered").touch()
            give_up = time.monotonic() + 30
            while not (gate / "release").exists() and time.monotonic() < give_up:
                time.sleep(0.005)
        if first == -2.0:
            raise RuntimeError("predict exploded")
        return model.inplace_predict(data)
"""


def wait_for_file(path: Path, timeout_s: float = 30.0) -> None:
    give_up = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < give_up, f"{path} never appeared"
        time.sleep(0.005)


def test_model_fn_and_predict_fn_from_sagemaker_program_serve_a_booster(
    serve, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    served = serve(
        {
            "handler.py": HANDLER_PY,
            "inference.py": "raise RuntimeError('SAGEMAKER_PROGRAM names handler.py')\n",
        },
        model_name="xgboost-model",
        SAGEMAKER_PROGRAM="handler.py",
        HANDLER_TEST_GATE=str(gate),
    )
    # prepare imported the script but compiled nothing: model_fn loads the model
    assert any("loaded by model_fn" in line for line in served.server.lines)
    r = served.invoke(text_rows(SAMPLE))  # the default input_fn: CSV of any width
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(csv_scores(r.text).ravel(), WANT, atol=1e-6)
    # a script that replaces the prediction serves /invocations only, and says so
    r = served.http.get("/v2/models/model")
    assert r.status_code == 404 and "code/handler.py" in r.json()["message"]

    # a slow predict_fn runs in a handler thread: /ping keeps answering meanwhile
    held = SAMPLE[:1].copy()
    held[0, 0] = -1.0
    answers: list[httpx.Response] = []
    caller = threading.Thread(target=lambda: answers.append(served.invoke(text_rows(held))))
    caller.start()
    try:
        wait_for_file(gate / "entered")
        assert served.http.get("/ping").status_code == 200
        assert not answers  # predict_fn is still held
    finally:
        (gate / "release").touch()
        caller.join(30)
    assert answers[0].status_code == 200, answers[0].text

    # an exception in predict_fn: 500 with its type and message; the next request is served
    broken = SAMPLE[:1].copy()
    broken[0, 0] = -2.0
    r = served.invoke(text_rows(broken))
    assert r.status_code == 500
    assert r.json()["message"] == (
        "handler predict_fn in code/handler.py failed: RuntimeError: predict exploded"
    )
    r = served.invoke(text_rows(SAMPLE[:2]))
    assert r.status_code == 200
    np.testing.assert_allclose(csv_scores(r.text).ravel(), WANT[:2], atol=1e-6)


# -- batch-safe predict_fn ---------------------------------------------------------------------

BATCH_SAFE = """
    import itertools
    import time

    import numpy as np
    from rtbserve.handlers import batch_safe

    _calls = itertools.count(1)

    @batch_safe
    def predict_fn(rows, model):
        call = next(_calls)
        time.sleep(0.2)  # a slow call: the requests arriving meanwhile gather for the next one
        return np.column_stack([model.predict(rows), np.full(len(rows), call)])
"""


def test_batch_safe_predict_fn_scores_concurrent_requests_in_fewer_calls(serve) -> None:
    served = serve({"inference.py": BATCH_SAFE})
    n_requests = 16
    rows = np.resize(SAMPLE, (n_requests, N_FEATURES))
    with ThreadPoolExecutor(n_requests) as pool:
        responses = list(pool.map(lambda row: served.invoke(text_rows(row[None])), rows))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    answers = np.array([csv_scores(r.text)[0] for r in responses])  # (score, call number)
    np.testing.assert_allclose(answers[:, 0], np.resize(WANT, n_requests), atol=1e-5)
    calls = set(answers[:, 1].astype(int))
    assert len(calls) < n_requests, f"{n_requests} requests took {len(calls)} predict_fn calls"


# -- refused at start-up -----------------------------------------------------------------------


def test_transform_fn_with_predict_fn_is_refused_at_start(tmp_path: Path, cache: Path) -> None:
    script = """
        def predict_fn(data, model):
            return model.predict(data)

        def transform_fn(model, body, content_type, accept):
            return body
    """
    server, _ = server_process(model_base(tmp_path, {"inference.py": script}), cache)
    server.launch()
    assert server.proc is not None
    code = server.proc.wait(timeout=60)
    server.stop()
    assert code == 2
    assert (
        "code/inference.py defines transform_fn together with predict_fn: transform_fn "
        "replaces input_fn, predict_fn and output_fn" in server.stderr
    )
    assert not any(line.startswith("ready") for line in server.lines)


# -- in process: script checks, discovery, SAGEMAKER_PROGRAM, default decoding -----------------


@pytest.fixture
def scripts(tmp_path: Path) -> Iterator[object]:
    """write(name, source) -> a script path under tmp/model/code; imports are undone after."""
    code = tmp_path / "model" / "code"
    code.mkdir(parents=True)
    saved_path = list(sys.path)

    def write(name: str, source: str) -> Path:
        path = code / name
        path.write_text(textwrap.dedent(source))
        return path

    yield write
    sys.path[:] = saved_path
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", "") or "").startswith(str(tmp_path)):
            del sys.modules[name]


def test_script_checks(scripts) -> None:
    plain = handlers.load_script(scripts("plain_handler.py", "import json\n"))
    assert not plain.defines_any
    attr = handlers.load_script(
        scripts(
            "attr_handler.py",
            """
            def predict_fn(rows, model):
                return rows[:, 0]
            predict_fn.batch_safe = True
            """,
        )
    )
    assert attr.is_predict_batch_safe and attr.predict_fn is not None
    assert handlers.load_script(attr.path) is attr  # imported once per process
    with pytest.raises(ConfigError, match=r"batch_safe must be True or False, got 'yes'"):
        handlers.load_script(
            scripts(
                "flag_handler.py",
                "def predict_fn(d, m):\n    pass\npredict_fn.batch_safe = 'yes'\n",
            )
        )
    with pytest.raises(ConfigError, match=r"importing it failed: ZeroDivisionError"):
        handlers.load_script(scripts("broken_handler.py", "x = 1 / 0\n"))
    with pytest.raises(ConfigError, match=r"input_fn must be a function, got int"):
        handlers.load_script(scripts("int_handler.py", "input_fn = 3\n"))
    with pytest.raises(
        ConfigError, match=r"defines transform_fn together with input_fn, output_fn"
    ):
        handlers.load_script(
            scripts(
                "both_handler.py",
                "def transform_fn(m, b, c, a): pass\ndef input_fn(b, c): pass\n"
                "def output_fn(p, a): pass\n",
            )
        )


def test_a_model_fn_result_without_predict_needs_predict_fn(scripts, tmp_path: Path) -> None:
    script = handlers.load_script(scripts("dict_handler.py", "def model_fn(d):\n    return {}\n"))
    model = handlers.call_model_fn(script, tmp_path / "model")
    settings = ModelSettings(name="m", path=tmp_path / "model", handler_script=script.path)
    with pytest.raises(ConfigError, match=r"model_fn returned a dict, which has no predict"):
        handlers.HandledModel(settings, script, model)
    none = handlers.load_script(scripts("none_handler.py", "def model_fn(d):\n    return None\n"))
    with pytest.raises(ConfigError, match=r"model_fn returned None"):
        handlers.call_model_fn(none, tmp_path / "model")


def test_discovery_and_sagemaker_program(tmp_path: Path) -> None:
    base = model_base(tmp_path, {"inference.py": "", "other.py": ""})
    model_dir = base / "model"
    (found,) = discover_models(model_dir)
    assert found.handler_script == model_dir / "code" / "inference.py"
    env = sagemaker.parse_environment(
        {"SAGEMAKER_BASE_DIR": str(base), "SAGEMAKER_PROGRAM": "other.py"}
    )
    (chosen,) = sagemaker.server_settings(env, [found]).models
    assert chosen.handler_script == model_dir / "code" / "other.py"
    missing = sagemaker.parse_environment(
        {"SAGEMAKER_BASE_DIR": str(base), "SAGEMAKER_PROGRAM": "absent.py"}
    )
    with pytest.raises(ConfigError, match=r"SAGEMAKER_PROGRAM='absent.py': no such script"):
        sagemaker.server_settings(missing, [found])
    for bad in ("../x.py", "/abs/x.py", "inference"):
        with pytest.raises(ConfigError, match=r"SAGEMAKER_PROGRAM="):
            sagemaker.parse_environment({"SAGEMAKER_PROGRAM": bad})
    # no model file rtbserve knows, but user scripts: one model (model_fn loads it)
    (model_dir / "model.json").rename(model_dir / "weights.bin")
    (model_dir / "weights.bin").write_bytes(b"\x00opaque")
    (custom,) = discover_models(model_dir)
    assert custom.path == model_dir and custom.handler_script is not None


def test_default_input_fn_without_rtbserves_model_reads_any_width() -> None:
    import io

    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(handlers.decode_matrix(b"0,1,2\n3,4,5\n", "text/csv"), rows)
    np.testing.assert_array_equal(
        handlers.decode_matrix(json.dumps(rows.tolist()).encode(), "application/json"), rows
    )
    buf = io.BytesIO()
    np.save(buf, rows.astype(np.float64))
    np.testing.assert_array_equal(handlers.decode_matrix(buf.getvalue(), "application/x-npy"), rows)
    with pytest.raises(InvalidInput):
        handlers.decode_matrix(b"0,1\n2\n", "text/csv")
    with pytest.raises(UnsupportedMediaType, match="text/csv, application/json, application/x-npy"):
        handlers.decode_matrix(b"x", "image/png")
