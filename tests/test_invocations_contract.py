"""The complete ``POST /invocations`` contract, through the real HTTP transport and app.

The demo model (numba backend) is served in process by ``start_http_server`` on a background
uvloop thread (``test_http_transport.ServerThread``), so requests cross a real socket: every
content type in and every Accept out against the golden payloads in ``tests/data/sagemaker``,
selectable outputs, status codes, Batch Transform's one line per record, and a Hypothesis fuzz
that throws garbage of every content type and must only ever get 2xx/4xx. Two tests start
``rtbserve serve`` itself to check that the SageMaker environment is read at start-up. A
performance gate compares codec costs with the model's own, as ratios measured in one run.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serverproc import DEMO, ServerProcess
from test_http_transport import ServerThread

import rtbserve
from rtbserve.codecs import decode_rows, encode_scores
from rtbserve.codecs.recordio_codec import Record, split_records
from rtbserve.codecs.sagemaker_env import InvocationsOptions
from rtbserve.config import ModelSettings
from rtbserve.dataplane import DataPlane
from rtbserve.errors import ConfigError
from rtbserve.metrics import WorkerMetrics
from rtbserve.transports.http import HttpLimits
from rtbserve.transports.http.inference_app import InferenceApp

GOLDEN = Path(__file__).parent / "data" / "sagemaker"
SELECTED = ("predicted_label", "probability", "probabilities", "raw_score", "labels")
REQUESTS = {  # content type -> golden request file
    "text/csv": "request.csv",
    "text/libsvm": "request.libsvm",
    "text/x-libsvm": "request.libsvm",
    "application/json": "request.json",
    "application/jsonlines": "request.jsonl",
    "application/x-recordio-protobuf": "request.recordio",
    "application/x-npy": "request.npy",
    "application/vnd.apache.arrow.stream": "request.arrow",
    "application/x-parquet": "request.parquet",
}
EXTENSIONS = {  # Accept -> golden response extension
    "text/csv": "csv",
    "application/json": "json",
    "application/jsonlines": "jsonl",
    "application/x-recordio-protobuf": "recordio",
    "application/x-npy": "npy",
}


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def demo_model(session_cache: Path) -> Any:
    return rtbserve.load_model(DEMO, backend="numba", cache_dir=session_cache)


@pytest.fixture(scope="module")
def start_app(
    demo_model: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., tuple[ServerThread, InferenceApp]]]:
    """``start_app(options, ready=True, max_body_bytes=...)``: the demo model behind a real
    socket; every server started is stopped (and checked for loop errors) at module end."""
    started: list[tuple[ServerThread, WorkerMetrics]] = []

    def start(
        options: InvocationsOptions | None = None,
        *,
        ready: bool = True,
        max_body_bytes: int = 6 * 1024 * 1024,
        output: str = "probability",
    ) -> tuple[ServerThread, InferenceApp]:
        metrics = WorkerMetrics(tmp_path_factory.mktemp("metrics"), 0)
        dataplane = DataPlane(metrics)
        dataplane.add(ModelSettings(name="rtb-filter", path=DEMO, output=output), demo_model)
        app = InferenceApp(dataplane, metrics, options=options or InvocationsOptions())
        if ready:
            dataplane.mark_ready()
        server = ServerThread(app, HttpLimits(max_body_bytes=max_body_bytes))  # type: ignore[arg-type]
        server.start()
        started.append((server, metrics))
        return server, app

    yield start
    for server, metrics in started:
        server.stop()
        metrics.close()
        assert not server.loop_errors, f"exceptions reached the event loop: {server.loop_errors}"


def client_for(server: ServerThread) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10)


@pytest.fixture(scope="module")
def plain(start_app: Callable[..., Any]) -> Iterator[httpx.Client]:
    server, _ = start_app()
    with client_for(server) as client:
        yield client


@pytest.fixture(scope="module")
def selected(start_app: Callable[..., Any]) -> Iterator[httpx.Client]:
    server, _ = start_app(InvocationsOptions("application/json", SELECTED))
    with client_for(server) as client:
        yield client


def invoke(client: httpx.Client, body: bytes, content_type: str | None, accept: str | None = None):
    headers = {}
    if content_type is not None:
        headers["content-type"] = content_type
    if accept is not None:
        headers["accept"] = accept
    return client.post("/invocations", content=body, headers=headers)


# --------------------------------------------------------------------------- comparing payloads

_NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:e-?\d+)?")


def _rounded(text: bytes) -> bytes:
    """Numbers to 6 significant digits: goldens survive a last-ulp difference in exp()."""
    return _NUMBER.sub(lambda m: b"%.6g" % float(m.group()), text)


def assert_same_payload(media_type: str, actual: bytes, golden: bytes) -> None:
    """Same structure and text; numbers equal to 6 significant digits (npy and RecordIO are
    decoded and compared to rtol 1e-6)."""
    if media_type == "application/x-npy":
        a, g = np.load(io.BytesIO(actual)), np.load(io.BytesIO(golden))
        assert a.dtype == g.dtype and a.shape == g.shape
        np.testing.assert_allclose(a, g, rtol=1e-6)
    elif media_type == "application/x-recordio-protobuf":
        a, g = labels_of(actual), labels_of(golden)
        assert [sorted(r) for r in a] == [sorted(r) for r in g]
        for ra, rg in zip(a, g, strict=True):
            for key in rg:
                np.testing.assert_allclose(ra[key], rg[key], rtol=1e-6)
    else:
        assert _rounded(actual) == _rounded(golden)


def labels_of(body: bytes) -> list[dict[str, list[float]]]:
    return [
        {k: list(v.float32_tensor.values) for k, v in Record.FromString(p).label.items()}
        for p in split_records(body)
    ]


def expected_scores() -> np.ndarray:
    return np.array(orjson.loads((GOLDEN / "expected.json").read_bytes())["scores"], np.float32)


# --------------------------------------------------------------------------- every type in and out


@pytest.mark.parametrize("content_type", list(REQUESTS))
@pytest.mark.parametrize("accept", list(EXTENSIONS))
def test_every_content_type_in_and_accept_out_matches_the_goldens(plain, content_type, accept):
    r = invoke(plain, (GOLDEN / REQUESTS[content_type]).read_bytes(), content_type, accept)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == accept
    assert_same_payload(accept, r.content, (GOLDEN / f"response.{EXTENSIONS[accept]}").read_bytes())


def test_golden_scores_are_the_reference_librarys() -> None:
    import xgboost as xgb

    rows = decode_rows((GOLDEN / "request.csv").read_bytes(), "text/csv", 67)
    reference = xgb.Booster(model_file=str(DEMO / "model.json")).inplace_predict(rows)
    np.testing.assert_allclose(expected_scores(), reference, atol=1e-6)
    labels = [
        r["predicted_label"]
        for r in orjson.loads((GOLDEN / "selected.json").read_bytes())["predictions"]
    ]
    assert labels == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("content_type", list(REQUESTS))
@pytest.mark.parametrize("accept", [a for a in EXTENSIONS if a != "application/x-npy"])
def test_selected_outputs_in_every_layout_match_the_goldens(selected, content_type, accept):
    r = invoke(selected, (GOLDEN / REQUESTS[content_type]).read_bytes(), content_type, accept)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == accept
    assert_same_payload(accept, r.content, (GOLDEN / f"selected.{EXTENSIONS[accept]}").read_bytes())


def test_selected_outputs_use_their_default_accept_and_refuse_npy(selected):
    body = (GOLDEN / "request.csv").read_bytes()
    for accept in (None, "*/*", "application/*;q=0.9, text/plain;q=0.1"):
        r = invoke(selected, body, "text/csv", accept)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        first = r.json()["predictions"][0]
        assert list(first) == list(SELECTED)
        p = expected_scores()[0]
        assert first["probabilities"] == pytest.approx([1 - p, p], rel=1e-6)
    r = invoke(selected, body, "text/csv", "application/x-npy")
    assert r.status_code == 406
    assert (
        "supported: text/csv, application/json, application/jsonlines, application/x-recordio"
        in (r.json()["message"])
    )


def test_other_sources_of_the_same_rows(plain):
    scores = expected_scores()
    for file in ("request_f64.recordio", "request_sparse.recordio"):
        r = invoke(plain, (GOLDEN / file).read_bytes(), "application/x-recordio-protobuf")
        assert r.status_code == 200
        np.testing.assert_allclose(np.array(r.text.split(), np.float32), scores, rtol=1e-6)
    r = invoke(
        plain, (GOLDEN / "request.csv").read_bytes(), "TEXT/CSV; Charset=UTF-8; label_size=1"
    )
    assert r.status_code == 200
    r = invoke(plain, (GOLDEN / "request.csv").read_bytes(), None)  # no Content-Type: CSV
    assert r.status_code == 200


# --------------------------------------------------------------------------- Accept


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "text/csv"),
        ("", "text/csv"),
        ("*/*", "text/csv"),
        ("application/json", "application/json"),
        ("Application/JSON; charset=utf-8", "application/json"),
        ("text/html, application/jsonlines;q=0.9, */*;q=0.1", "application/jsonlines"),
        ("application/json;q=0.5, application/x-npy", "application/x-npy"),
        ("application/*", "application/json"),
        ("image/png, */*;q=0.2", "text/csv"),
        ("text/csv;q=0, application/*;q=0.5", "application/json"),
    ],
)
def test_accept_negotiation(plain, accept, expected):
    r = invoke(plain, (GOLDEN / "request.csv").read_bytes(), "text/csv", accept)
    assert r.status_code == 200 and r.headers["content-type"] == expected


def test_default_accept_answers_missing_and_wildcard_accept(start_app):
    server, _ = start_app(InvocationsOptions(default_accept="application/jsonlines"))
    with client_for(server) as client:
        for accept in (None, "*/*", "application/*"):  # a tie goes to the default
            r = invoke(client, b"\n".join([b",".join([b"0"] * 67)] * 2), "text/csv", accept)
            assert r.headers["content-type"] == "application/jsonlines"
            assert r.text.count("\n") == 2


def test_a_bad_default_accept_or_selection_stops_the_app():
    with pytest.raises(ConfigError, match="'image/png' is not a type /invocations can answer"):
        InferenceApp(DataPlane(), None, options=InvocationsOptions("image/png"))  # type: ignore[arg-type]


def test_selection_on_a_model_served_as_margins_stops_the_app(start_app):
    with pytest.raises(ConfigError, match=r"served with output='margin' \(rtbserve.toml\)"):
        start_app(InvocationsOptions(inference_output=("probability",)), output="margin")


# --------------------------------------------------------------------------- status codes


ROW = (GOLDEN / "request.csv").read_bytes().split(b"\n")[0]


@pytest.mark.parametrize(
    ("body", "content_type", "accept", "status", "message"),
    [
        (b"", "text/csv", None, 204, None),
        (b"", "image/png", None, 204, None),
        (ROW, "image/png", None, 415, "unsupported content type 'image/png'; supported: text/csv"),
        (ROW, "text/csv; charset=latin-1", None, 415, "unsupported charset"),
        (ROW, "text/csv; label_size=2", None, 415, "only label_size=1"),
        (b"a,b\n1,2", "text/csv", None, 415, "line 1, column 1"),
        (b"1,2,3", "text/csv", None, 400, "expected 67 features, got 3"),
        (b"[[1,2,3]]", "application/json", None, 400, "expected 67 features, got 3"),
        (b"[1,2,3]", "application/jsonlines", None, 400, "line 1: expected 67 features, got 3"),
        (b"1 70:1", "text/libsvm", None, 400, "expected 67 features (indices 0-66), got index 70"),
        (b"1 a:1", "text/x-libsvm", None, 415, "line 1, token 2"),
        (b"{", "application/json", None, 415, "not valid JSON"),
        (b"\x93NUMPY\x01\x00", "application/x-npy", None, 415, "not a valid .npy"),
        (b"garbage!", "application/x-recordio-protobuf", None, 415, "no record magic"),
        (b"garbage!", "application/vnd.apache.arrow.stream", None, 415, "not a valid Arrow"),
        (b"garbage!", "application/x-parquet", None, 415, "not a valid Parquet"),
        (ROW, "text/csv", "image/png", 406, "supported: text/csv, application/json, "),
        (ROW, "text/csv", "text/csv;q=0", 406, "cannot produce any type"),
    ],
)
def test_status_codes(plain, body, content_type, accept, status, message):
    r = invoke(plain, body, content_type, accept)
    assert r.status_code == status, r.text
    if message is not None:
        doc = r.json()
        assert doc["code"] == status and message in doc["message"], doc


def test_wrong_feature_count_is_400_in_every_binary_format(plain):
    rows = np.zeros((2, 3), np.float32)
    buf = io.BytesIO()
    np.save(buf, rows)
    r = invoke(plain, buf.getvalue(), "application/x-npy")
    assert r.status_code == 400 and "expected 67 features, got 3" in r.json()["message"]
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    table = pa.table({"a": [1.0], "b": [2.0]})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    r = invoke(plain, sink.getvalue().to_pybytes(), "application/vnd.apache.arrow.stream")
    assert r.status_code == 400 and "expected 67 features, got 2" in r.json()["message"]
    table = pa.table({"a": [1.0], "site": ["x"]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    r = invoke(plain, sink.getvalue().to_pybytes(), "application/vnd.apache.arrow.stream")
    assert r.status_code == 415 and "column 1 ('site') has type string" in r.json()["message"]


def test_body_over_the_limit_is_413(start_app):
    server, _ = start_app(max_body_bytes=1024)
    with client_for(server) as client:
        r = invoke(client, ROW * 10, "text/csv")
    assert r.status_code == 413


def test_not_ready_and_overloaded_are_503(start_app):
    server, app = start_app(ready=False)
    with client_for(server) as client:
        r = invoke(client, ROW, "text/csv")
        assert r.status_code == 503 and r.json()["type"] == "model_not_ready"
        server.call(app.dataplane.mark_ready)
        assert invoke(client, ROW, "text/csv").status_code == 200
        served = app.dataplane.served_models[0]
        server.call(lambda: setattr(served.batcher, "max_queue_rows", 0))  # every row sheds
        r = invoke(client, ROW, "text/csv")
        assert r.status_code == 503 and r.json()["type"] == "overloaded"


def test_custom_attributes_are_echoed(plain, selected):
    for client in (plain, selected):
        r = client.post(
            "/invocations",
            content=ROW,
            headers={"content-type": "text/csv", "x-amzn-sagemaker-custom-attributes": "a=1"},
        )
        assert r.headers["x-amzn-sagemaker-custom-attributes"] == "a=1"


# --------------------------------------------------------------------------- Batch Transform


@pytest.mark.parametrize(
    ("client_name", "accept"),
    [
        ("plain", "text/csv"),
        ("plain", "application/jsonlines"),
        ("selected", "text/csv"),
        ("selected", "application/jsonlines"),
    ],
)
def test_multi_record_batch_gets_one_line_per_record_in_order(
    request, demo_model, client_name, accept
):
    client = request.getfixturevalue(client_name)
    sample = (DEMO / "sample.csv").read_bytes()
    body = sample * 30  # 3000 records, several kernel calls
    r = invoke(client, body, "text/csv", accept)
    assert r.status_code == 200
    lines = r.content.split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == 3000  # each record's line "\n"-terminated
    expected = demo_model.predict(decode_rows(body, "text/csv", 67))
    if accept == "text/csv":
        got = [
            float(line.split(b",")[1 if client_name == "selected" else 0]) for line in lines[:-1]
        ]
    else:
        key = "probability" if client_name == "selected" else "score"
        got = [orjson.loads(line)[key] for line in lines[:-1]]
    np.testing.assert_array_equal(np.array(got, np.float32), expected)
    jsonl = b"".join(
        orjson.dumps(list(map(float, row))) + b"\n"
        for row in np.nan_to_num(decode_rows(sample, "text/csv", 67))
    )
    r = invoke(client, jsonl, "application/jsonlines", accept)
    assert r.status_code == 200 and r.content.count(b"\n") == 100


# --------------------------------------------------------------------------- fuzz

_GOLDEN_BYTES = {ct: (GOLDEN / f).read_bytes() for ct, f in REQUESTS.items()}
_CONTENT_TYPES = [*REQUESTS, "image/png", "", "text/csv; label_size=x", "application/json; q"]


_header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
    str.strip
)


@st.composite
def garbage(draw: st.DrawFn) -> tuple[str, bytes, str | None]:
    content_type = draw(st.one_of(st.sampled_from(_CONTENT_TYPES), _header_text))
    base = _GOLDEN_BYTES.get(content_type.split(";")[0], b"1,2,3\n")
    how = draw(st.sampled_from(["random", "truncate", "splice", "flip"]))
    if how == "random":
        body = draw(st.binary(max_size=300))
    elif how == "truncate":
        body = base[: draw(st.integers(0, len(base)))]
    else:
        at = draw(st.integers(0, len(base)))
        junk = draw(st.binary(min_size=1, max_size=16))
        if how == "splice":
            body = base[:at] + junk + base[at:]
        else:  # overwrite
            body = base[:at] + junk + base[at + len(junk) :]
    accept = draw(
        st.one_of(
            st.sampled_from([None, "*/*", "application/x-npy", "image/png", "text/*"]),
            _header_text,
        )
    )
    return content_type, body, accept


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=garbage())
def test_garbage_of_every_content_type_never_gets_a_5xx(plain, selected, case):
    content_type, body, accept = case
    for client in (plain, selected):
        r = invoke(client, body, content_type or None, accept)
        assert 200 <= r.status_code < 500, (r.status_code, r.text)
        if r.status_code >= 400:
            assert r.json()["code"] == r.status_code


# --------------------------------------------------------------------------- served process


def test_served_process_reads_the_sagemaker_environment(session_cache: Path) -> None:
    env = {
        "SAGEMAKER_INFERENCE_OUTPUT": "predicted_label,probability",
        "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "application/jsonlines",
    }
    with (
        ServerProcess(
            None, "--backend", "numba", workers=1, grpc=False, cache_dir=session_cache, env=env
        ) as server,
        httpx.Client(base_url=server.http_url, timeout=10) as client,
    ):
        r = invoke(client, (GOLDEN / "request.csv").read_bytes(), "text/csv")
        assert r.status_code == 200 and r.headers["content-type"] == "application/jsonlines"
        lines = [orjson.loads(line) for line in r.text.splitlines()]
        assert [list(x) for x in lines] == [["predicted_label", "probability"]] * 5
        assert [x["predicted_label"] for x in lines] == [0, 0, 0, 1, 1]


def test_a_bad_environment_stops_the_start_with_a_clear_message(session_cache: Path) -> None:
    env = {"SAGEMAKER_INFERENCE_OUTPUT": "predicted_label,probabilty"}
    server = ServerProcess(
        None, "--backend", "numba", workers=2, grpc=False, cache_dir=session_cache, env=env
    ).launch()
    try:
        line = server.wait_for(lambda s: s.startswith(("ready:", "stopped")), 120)
    finally:
        code = server.stop()
    assert line.startswith("stopped") and code != 0
    assert "unknown key 'probabilty'; valid keys: predicted_label" in server.stderr
    assert "Traceback" not in server.stderr  # the supervisor stops cleanly, nothing left dangling


# --------------------------------------------------------------------------- performance


def _median_ns(fn: Callable[[int], Any], calls: int) -> float:
    samples = np.empty(calls, dtype=np.int64)
    for i in range(calls):
        t0 = time.perf_counter_ns()
        fn(i)
        samples[i] = time.perf_counter_ns() - t0
    return float(np.median(samples))


@pytest.mark.gate
def test_one_row_csv_parse_and_encode_cost_less_than_the_model(demo_model) -> None:
    lines = (DEMO / "sample.csv").read_bytes().splitlines()
    rows = [decode_rows(line, "text/csv", 67) for line in lines]
    score = demo_model.predict(rows[0])
    for _ in range(3):  # the best of a few paired runs: this machine is shared and noisy
        model_ns = _median_ns(lambda i: demo_model.predict(rows[i % 100]), 5000)
        codec_ns = _median_ns(
            lambda i: (
                encode_scores(score, "text/csv") and decode_rows(lines[i % 100], "text/csv", 67)
            ),
            5000,
        )
        if codec_ns < model_ns:
            break
    assert codec_ns < model_ns, f"CSV parse + encode {codec_ns:.0f} ns, model {model_ns:.0f} ns"


@pytest.mark.gate
def test_binary_formats_decode_a_batch_faster_than_the_model_scores_it(demo_model) -> None:
    rows = np.tile(decode_rows((DEMO / "sample.csv").read_bytes(), "text/csv", 67), (100, 1))
    buf = io.BytesIO()
    np.save(buf, rows)
    npy = buf.getvalue()
    t0 = time.perf_counter()
    scores = demo_model.predict(rows, nthread=1)
    model_s = time.perf_counter() - t0
    for media in ("text/csv", "application/x-recordio-protobuf", "application/x-npy"):
        t0 = time.perf_counter()
        encode_scores(scores, media)
        encode_s = time.perf_counter() - t0
        assert encode_s < model_s / 5, f"{media}: encode {encode_s:.4f} s, model {model_s:.4f} s"
    t0 = time.perf_counter()
    decode_rows(npy, "application/x-npy", 67)
    assert time.perf_counter() - t0 < model_s / 5


class _ScoresThatCannotBeEncoded:
    """A model whose scores are not numbers: encoding them fails with a non-rtbserve error."""

    n_features = 67
    n_outputs = 1
    backend = "broken"

    def predict(self, rows: Any, **kw: Any) -> Any:
        return np.array(["not a score"] * len(rows), dtype=object)


def test_an_unexpected_encoding_failure_is_a_500_not_a_hung_request(
    demo_model: Any, tmp_path: Path
) -> None:
    (tmp_path / "metrics").mkdir()
    metrics = WorkerMetrics(tmp_path / "metrics", 0)
    dataplane = DataPlane(metrics)
    dataplane.add(ModelSettings(name="broken", path=DEMO), _ScoresThatCannotBeEncoded())
    dataplane.add(ModelSettings(name="rtb-filter", path=DEMO), demo_model)
    dataplane.mark_ready()
    server = ServerThread(InferenceApp(dataplane, metrics), HttpLimits())  # type: ignore[arg-type]
    server.start()
    try:
        with client_for(server) as client:
            row = b",".join(b"0" for _ in range(67))
            r = client.post("/invocations", content=row, headers={"content-type": "text/csv"})
            assert r.status_code == 500 and r.json()["message"] == "internal error"
            ok = client.post(
                "/v2/models/rtb-filter/infer",
                json={"inputs": [{"name": "input-0", "shape": [1, 67], "datatype": "FP32",
                                  "data": [0.0] * 67}]},
            )  # fmt: skip
            assert ok.status_code == 200
            assert ok.json()["outputs"][0]["data"][0] == pytest.approx(
                float(demo_model.predict(np.zeros((1, 67), np.float32))[0]), abs=1e-6
            )
    finally:
        server.stop()
        metrics.close()
