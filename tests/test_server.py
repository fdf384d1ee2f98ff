"""``rtbserve serve`` end to end: the supervisor, its workers, HTTP routes, repositories, metrics,
restarts and draining, through real sockets on 127.0.0.1 with real clients."""

from __future__ import annotations

import shutil
import signal
import socket
import threading
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import xgboost as xgb
from prometheus_client.parser import text_string_to_metric_families
from serverproc import DEMO, ServerProcess

SAMPLE = np.genfromtxt(DEMO / "sample.csv", delimiter=",", dtype=np.float32)
WANT = xgb.Booster(model_file=str(DEMO / "model.json")).inplace_predict(SAMPLE)


def csv_of(rows: np.ndarray) -> bytes:
    return "\n".join(",".join(repr(float(v)) for v in row) for row in rows).encode() + b"\n"


def oip_body(rows: np.ndarray) -> dict:
    data = [None if np.isnan(v) else float(v) for v in rows.ravel()]
    return {"inputs": [{"name": "input-0", "shape": list(rows.shape), "datatype": "FP32",
                        "data": data}]}  # fmt: skip


def scores_of(text: str) -> np.ndarray:
    return np.array([float(v) for v in text.split()], dtype=np.float32)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-cache")


@pytest.fixture(scope="module")
def server(cache: Path) -> ServerProcess:
    with ServerProcess(workers=2, metrics_port=True, cache_dir=cache) as s:
        yield s


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# -- the SageMaker routes and the Open Inference Protocol --------------------------------------


def test_invocations_scores_match_xgboost(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        assert client.get("/ping").status_code == 200
        r = client.post(
            "/invocations", content=csv_of(SAMPLE), headers={"content-type": "text/csv"}
        )
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(scores_of(r.text), WANT, atol=1e-6)
        one = client.post("/invocations", content=csv_of(SAMPLE[:1]))
        assert one.status_code == 200 and scores_of(one.text)[0] == pytest.approx(WANT[0], abs=1e-6)


def test_oip_rest_routes(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2").json()["name"] == "rtbserve"
        meta = client.get("/v2/models/rtb-filter").json()
        assert meta["inputs"][0]["shape"] == [-1, 67] and meta["name"] == "rtb-filter"
        assert client.get("/v2/models/rtb-filter/ready").status_code == 200
        assert client.get("/v2/models/rtb-filter/versions/1/ready").status_code == 200
        rows = SAMPLE[:5].copy()
        rows[0, 3] = np.nan
        data = [None if np.isnan(v) else float(v) for v in rows.ravel()]
        body = {"id": "req-7", "inputs": [{"name": "input-0", "shape": [5, 67], "datatype": "FP32",
                                            "data": data}]}  # fmt: skip
        r = client.post("/v2/models/rtb-filter/infer", json=body)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["id"] == "req-7" and doc["model_name"] == "rtb-filter"
        out = doc["outputs"][0]
        assert out["name"] == "output-0" and out["shape"] == [5]
        want = xgb.Booster(model_file=str(DEMO / "model.json")).inplace_predict(rows)
        np.testing.assert_allclose(out["data"], want, atol=1e-6)
        missing = client.get("/v2/models/nope")
        assert missing.status_code == 404 and "loaded: rtb-filter" in missing.json()["error"]
        bad = client.post("/v2/models/rtb-filter/infer", json={"inputs": [{"name": "x",
                          "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]})  # fmt: skip
        assert bad.status_code == 400 and "expected 67 features, got 3" in bad.json()["error"]


def test_tritonclient_http_binary_and_json(server: ServerProcess) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("rtb-filter")
        assert client.get_model_metadata("rtb-filter")["inputs"][0]["shape"] == [-1, 67]
        for binary in (True, False):
            inp = httpclient.InferInput("input-0", [7, 67], "FP32")
            inp.set_data_from_numpy(SAMPLE[:7], binary_data=binary)
            out = httpclient.InferRequestedOutput("output-0", binary_data=binary)
            result = client.infer("rtb-filter", [inp], outputs=[out], request_id="abc")
            np.testing.assert_allclose(result.as_numpy("output-0"), WANT[:7], atol=1e-6)
            assert result.get_response()["id"] == "abc"
    finally:
        client.close()


def test_errors_are_clear_4xx_and_the_workers_keep_serving(server: ServerProcess) -> None:
    host, port = server.http_url.removeprefix("http://").split(":")
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        r = client.post("/invocations", content=b"1,2,3\n")
        assert r.status_code == 400 and "expected 67 features" in r.json()["message"]
        r = client.post("/invocations", content=b"{}", headers={"content-type": "image/png"})
        assert r.status_code == 415 and "text/csv" in r.json()["message"]
        r = client.post("/invocations", content=csv_of(SAMPLE[:1]), headers={"accept": "x/y"})
        assert r.status_code == 406
        r = client.post("/invocations", content=csv_of(SAMPLE[:1]),
                        headers={"x-rtb-deadline-ms": "soon"})  # fmt: skip
        assert r.status_code == 400 and "milliseconds" in r.json()["message"]
        assert client.get("/nope").status_code == 404
        assert client.get("/invocations").status_code == 405
    for garbage in (
        b"\x00\x01\x02 nonsense\r\n\r\n",
        b"POST /invocations HTTP/1.1\r\nContent-Length: x\r\n\r\n",
    ):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(garbage)
            assert sock.recv(4096).startswith(b"HTTP/1.1 400")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 7000000\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        for _ in range(8):  # every worker still answers
            r = client.post("/invocations", content=csv_of(SAMPLE[:2]))
            assert r.status_code == 200


def test_pipelined_requests_are_answered_in_order(server: ServerProcess) -> None:
    host, port = server.http_url.removeprefix("http://").split(":")
    bodies = [csv_of(SAMPLE[i : i + 1]) for i in range(20)]
    wire = b"".join(
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\n"
        + f"Content-Length: {len(b)}\r\n\r\n".encode()
        + b
        for b in bodies
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(wire)
        got = b""
        while got.count(b"HTTP/1.1 200") < 20 or not got.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk
    scores = [float(part.split(b"\r\n\r\n", 1)[1]) for part in got.split(b"HTTP/1.1 ")[1:]]
    np.testing.assert_allclose(scores, WANT[:20], atol=1e-6)


def test_metrics_aggregate_every_worker(server: ServerProcess) -> None:
    before = metric_samples(httpx.get(server.metrics_url).text)
    key = (
        "rtbserve_requests_total",
        (("model", "rtb-filter"), ("route", "invocations"), ("status", "200")),
    )  # noqa: E501
    n = 60
    for _ in range(n):  # new connections: SO_REUSEPORT spreads them over both workers
        with httpx.Client(base_url=server.http_url, timeout=30) as client:
            assert client.post("/invocations", content=csv_of(SAMPLE[:1])).status_code == 200
    text = httpx.get(server.http_url + "/metrics").text  # the HTTP port serves it too
    after = metric_samples(text)
    assert after[key] - before.get(key, 0.0) == n
    assert after[("rtbserve_workers", ())] == 2
    stage = ("rtbserve_stage_seconds_count", (("model", "rtb-filter"), ("stage", "predict")))
    assert after[stage] >= n
    assert ("rtbserve_batch_rows_count", (("model", "rtb-filter"),)) in after
    assert ("rtbserve_queue_rows", (("model", "rtb-filter"),)) in after


def test_thousands_of_concurrent_requests_across_both_transports_get_their_own_answers(
    server: ServerProcess,
) -> None:
    """HTTP (CSV and OIP), gRPC unary and gRPC streams at once: every answer is its own."""
    import asyncio

    import uvloop

    from rtbserve.client import AsyncGrpcClient, AsyncHttpClient

    rng = np.random.default_rng(7)
    n_each = 600
    picks = {
        kind: rng.integers(0, len(SAMPLE), n_each) for kind in ("csv", "oip", "unary", "stream")
    }

    async def main() -> dict[str, list[tuple[int, np.ndarray]]]:
        got: dict[str, list[tuple[int, np.ndarray]]] = {k: [] for k in picks}
        async with (
            AsyncHttpClient(server.http_url, pool_size=32, timeout_s=60) as http,
            AsyncGrpcClient(server.grpc_target, timeout_s=60) as grpc_client,
        ):
            streams = [grpc_client.stream() for _ in range(4)]

            async def one(kind: str, j: int, i: int) -> None:
                rows = SAMPLE[i : i + 1 + j % 3]  # 1-3 rows per request
                if kind == "csv":
                    scores = await http.predict(rows)
                elif kind == "oip":
                    scores = await http.predict(rows, model="rtb-filter")
                elif kind == "unary":
                    scores = await grpc_client.predict(rows, request_id=f"u{j}")
                else:
                    scores = await streams[j % 4].predict(rows, request_id=f"s{j}")
                got[kind].append((i, j, scores))

            await asyncio.gather(
                *(one(kind, j, int(i)) for kind, idx in picks.items() for j, i in enumerate(idx))
            )
            for st in streams:
                await st.close()
        return got

    got = uvloop.run(main())
    for kind, answers in got.items():
        assert len(answers) == n_each, kind
        for i, j, scores in answers:
            want = WANT[i : i + 1 + j % 3]
            np.testing.assert_allclose(scores, want, atol=1e-6, err_msg=f"{kind} request {j}")


def test_grpc_health_reflection_and_tritonclient(server: ServerProcess) -> None:
    import grpc
    import tritonclient.grpc as grpcclient
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rtb-filter"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    client = grpcclient.InferenceServerClient(server.grpc_target)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("rtb-filter")
        inp = grpcclient.InferInput("input-0", [9, 67], "FP32")
        inp.set_data_from_numpy(SAMPLE[:9])
        result = client.infer("rtb-filter", [inp], request_id="t-1")
        np.testing.assert_allclose(result.as_numpy("output-0"), WANT[:9], atol=1e-6)
        assert result.get_response().id == "t-1"
    finally:
        client.close()


# -- repositories and per-model settings -------------------------------------------------------


def make_repo(root: Path, tomls: dict[str, str]) -> Path:
    for name, toml in tomls.items():
        d = root / name
        d.mkdir(parents=True)
        shutil.copy(DEMO / "model.json", d / "model.json")
        if toml:
            (d / "rtbserve.toml").write_text(toml)
    return root


def test_repository_serves_the_default_and_others_by_name(tmp_path: Path, cache: Path) -> None:
    repo = make_repo(
        tmp_path / "repo",
        {"alpha": "", "beta": 'default = true\noutput = "label"\nthreshold = 0.2\n'},
    )
    with (
        ServerProcess(repo, workers=1, cache_dir=cache, grpc=False) as s,
        httpx.Client(base_url=s.http_url, timeout=30) as client,
    ):
        labels = client.post("/invocations", content=csv_of(SAMPLE))  # beta: labels at 0.2
        assert labels.status_code == 200
        np.testing.assert_array_equal(scores_of(labels.text), (WANT > 0.2).astype(np.float32))
        body = oip_body(SAMPLE[:3])
        alpha = client.post("/v2/models/alpha/infer", json=body).json()["outputs"][0]
        np.testing.assert_allclose(alpha["data"], WANT[:3], atol=1e-6)
        beta = client.post("/v2/models/beta/infer", json=body).json()["outputs"][0]
        assert beta["datatype"] == "INT32"
        assert client.get("/v2/models/gamma/ready").status_code == 503


def test_bad_model_settings_stop_the_start_with_a_clear_message(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"alpha": "backend = 'numba'\nbatchin = 3\n"})
    s = ServerProcess(repo, workers=1, grpc=False, cache_dir=tmp_path / "c").launch()
    s.proc.wait(timeout=60)  # exits by itself
    assert s.stop() == 2
    assert "unknown key(s) batchin" in s.stderr


def test_deadline_gives_504_or_the_fail_open_default(tmp_path: Path, cache: Path) -> None:
    repo = make_repo(
        tmp_path / "repo", {"strict": "default = true\n", "lenient": "[fail_open]\nscore = 1.0\n"}
    )
    with (
        ServerProcess(repo, workers=1, cache_dir=cache, grpc=False) as s,
        httpx.Client(base_url=s.http_url, timeout=30) as client,
    ):
        tiny = {"x-rtb-deadline-ms": "0.000001"}
        r = client.post("/invocations", content=csv_of(SAMPLE[:1]), headers=tiny)
        assert r.status_code == 504 and "deadline" in r.json()["message"]
        body = oip_body(SAMPLE[:2])
        r = client.post("/v2/models/lenient/infer", json=body, headers=tiny)
        assert r.status_code == 200 and r.headers["x-rtb-fail-open"] == "1"
        assert r.json()["outputs"][0]["data"] == [1.0, 1.0]
        assert r.json()["parameters"] == {"fail_open": True}
        ok = client.post(
            "/v2/models/lenient/infer", json=body, headers={"x-rtb-deadline-ms": "5000"}
        )
        assert "x-rtb-fail-open" not in ok.headers
        np.testing.assert_allclose(ok.json()["outputs"][0]["data"], WANT[:2], atol=1e-6)


# -- the process model: start-up, restarts, draining --------------------------------------------


def test_ping_is_503_while_models_compile(tmp_path: Path) -> None:
    s = ServerProcess(workers=1, grpc=False, cache_dir=tmp_path / "cold").launch()
    try:
        s.wait_for(lambda line: line.startswith("listening on http://"))
        r = httpx.get(s.http_url + "/ping", timeout=30)  # the cold compile takes seconds
        assert r.status_code == 503 and "starting" in r.text
        s.wait_for(lambda line: line.startswith("ready:"), timeout_s=300)
        assert httpx.get(s.http_url + "/ping", timeout=30).status_code == 200
    finally:
        assert s.stop() == 0


def test_a_killed_worker_is_restarted_and_the_server_keeps_answering(cache: Path) -> None:
    with ServerProcess(workers=2, cache_dir=cache, grpc=False) as s:
        stop = threading.Event()
        outcomes: list[str] = []

        def load(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                with httpx.Client(base_url=s.http_url, timeout=30) as client:
                    for _ in range(20):
                        i = int(rng.integers(0, len(SAMPLE)))
                        try:
                            r = client.post("/invocations", content=csv_of(SAMPLE[i : i + 1]))
                        except httpx.TransportError:
                            outcomes.append("connection")  # the killed worker's connections
                            break
                        ok = r.status_code == 200 and abs(float(r.text) - WANT[i]) < 1e-6
                        outcomes.append("ok" if ok else f"bad {r.status_code} {r.text}")

        threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        try:
            victim = s.worker_pids()[0]
            import os

            os.kill(victim, signal.SIGKILL)
            s.wait_for(lambda line: "exited with signal SIGKILL; restarting" in line)
            s.wait_for(lambda line: "ready again" in line)
            mark = len(outcomes)
            assert victim not in s.worker_pids() and len(s.worker_pids()) == 2
            with httpx.Client(base_url=s.http_url, timeout=30) as client:
                for i in range(40):
                    r = client.post("/invocations", content=csv_of(SAMPLE[i : i + 1]))
                    assert r.status_code == 200
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not [o for o in outcomes if o.startswith("bad")]
        assert outcomes[mark:].count("ok") > 0


def test_sigterm_drains_an_in_flight_request(cache: Path) -> None:
    s = ServerProcess(workers=1, cache_dir=cache, grpc=False).start()
    host, port = s.http_url.removeprefix("http://").split(":")
    body = csv_of(SAMPLE)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])  # fmt: skip
        # the worker holds a started request: the drain must wait for it
        assert httpx.get(s.http_url + "/ping").status_code == 200
        s.proc.send_signal(signal.SIGTERM)
        s.wait_for(lambda line: line == "draining")
        sock.sendall(body[100:])
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    head, _, payload = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")  # answered, then the drain closed the connection
    np.testing.assert_allclose(scores_of(payload.decode()), WANT, atol=1e-6)
    assert s.stop() == 0
    assert s.lines[-1] == "stopped"


def test_a_full_queue_sheds_with_503_before_decoding_or_fails_open(
    tmp_path: Path, cache: Path
) -> None:
    """Pipelined requests parsed in one read queue together: past max_queue_rows they are shed
    at once (503), or answered with the default decision by a model that fails open on overload.
    """
    repo = make_repo(
        tmp_path / "repo",
        {
            "strict": "default = true\n[batching]\nmax_queue_rows = 1\n",
            "lenient": "[batching]\nmax_queue_rows = 1\n"
            "[fail_open]\nscore = 1.0\non_overload = true\n",
        },
    )
    body = csv_of(SAMPLE[:1])
    oip = orjson.dumps(oip_body(SAMPLE[:1]))

    def pipelined(path: str, payload: bytes, n: int) -> list[bytes]:
        wire = b"".join(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
            for _ in range(n)
        )
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(wire)
            got = b""
            while got.count(b"HTTP/1.1 ") < n or not got.endswith((b"\n", b"}")):
                chunk = sock.recv(65536)
                assert chunk, got
                got += chunk
        return [b"HTTP/1.1 " + part for part in got.split(b"HTTP/1.1 ")[1:]]

    with ServerProcess(repo, workers=1, cache_dir=cache, grpc=False) as s:
        host, port = s.http_url.removeprefix("http://").split(":")
        answers = pipelined("/invocations", body, 6)
        assert answers[0].startswith(b"HTTP/1.1 200")
        shed = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert shed and all(b"overloaded" in a for a in shed)
        assert all(a.startswith((b"HTTP/1.1 200", b"HTTP/1.1 503")) for a in answers)
        lenient = pipelined("/v2/models/lenient/infer", oip, 6)
        assert all(a.startswith(b"HTTP/1.1 200") for a in lenient)
        failed_open = [a for a in lenient if b"x-rtb-fail-open: 1" in a.lower()]
        assert failed_open and all(b'"data":[1.0]' in a for a in failed_open)
        metrics = metric_samples(httpx.get(s.http_url + "/metrics").text)
        assert metrics[("rtbserve_shed_total", (("model", "strict"),))] == len(shed)
        assert metrics[("rtbserve_fail_open_total", (("model", "lenient"),))] == len(failed_open)
