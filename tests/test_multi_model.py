"""SageMaker multi-model endpoints: the ``serve`` entry point with ``SAGEMAKER_MULTI_MODEL=true``
and two workers, driven through the management API as SageMaker drives it (real sockets, a fresh
connection per call so the kernel spreads them over both workers); the shared registry and the
memory bound in process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import xgboost as xgb
from serverproc import DEMO, ServerProcess
from test_sagemaker_serve import csv_of, free_port, port_of, scores_of, serve_command

from rtbserve import sagemaker
from rtbserve.config import ModelSettings, MultiModelSettings, settings_from_json, settings_to_json
from rtbserve.dataplane import DataPlane
from rtbserve.errors import ConfigError, ModelNotFound
from rtbserve.model_registry import (
    InsufficientMemory,
    ModelAlreadyLoaded,
    ModelRegistry,
    SharedRegistry,
)

SAMPLE = np.genfromtxt(DEMO / "sample.csv", delimiter=",", dtype=np.float32)
WANT = xgb.Booster(model_file=str(DEMO / "model.json")).inplace_predict(SAMPLE)
WANT_LABELS = (WANT >= 0.5).astype(np.int32)  # the copies carry no features.json: 0.5
FRESH = 16  # fresh connections per check: all on one of two workers has odds 2**-15


@pytest.fixture(scope="module", autouse=True)
def _no_sagemaker_variables_inherited() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith(("SAGEMAKER_", "RTBSERVE_MAX_", "RTBSERVE_MEMORY_")):
                mp.delenv(name)
        mp.delenv("RTBSERVE_BAKED_MODEL", raising=False)
        yield


def model_dir(base: Path, name: str, toml: str | None = None) -> Path:
    """SageMaker's layout: each model under BASE/models/<name>/model."""
    where = base / "models" / name / "model"
    where.mkdir(parents=True)
    shutil.copy(DEMO / "model.json", where / "model.json")
    if toml is not None:
        (where / "rtbserve.toml").write_text(toml)
    return where


class Endpoint:
    def __init__(self, server: ServerProcess, port: int, base: Path) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{port}"
        self.base = base
        self.probs = model_dir(base, "probs")
        self.labels = model_dir(base, "labels", 'output = "label"\n')

    def call(self, method: str, path: str, **kw: object) -> httpx.Response:
        """One request on a fresh connection (so successive calls reach both workers)."""
        return httpx.request(method, self.url + path, timeout=60, **kw)  # type: ignore[arg-type]

    def load(self, name: str, url: Path | str) -> httpx.Response:
        return self.call("POST", "/models", json={"model_name": name, "url": str(url)})

    def invoke(self, name: str, rows: np.ndarray = SAMPLE) -> httpx.Response:
        return self.call(
            "POST",
            f"/models/{name}/invoke",
            content=csv_of(rows),
            headers={"content-type": "text/csv", "X-Amzn-SageMaker-Target-Model": f"{name}.tgz"},
        )


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    base = tmp_path_factory.mktemp("mme") / "opt-ml"  # no BASE/model at all
    base.mkdir()
    port = free_port()
    env = {
        "SAGEMAKER_BASE_DIR": str(base),
        "RTBSERVE_CACHE_DIR": str(tmp_path_factory.mktemp("mme-cache")),
        "SAGEMAKER_MULTI_MODEL": "true",
        "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "SAGEMAKER_SAFE_PORT_RANGE": f"{port}-{min(port + 15, 65535)}",
        "RTBSERVE_MAX_MODELS": "2",
    }
    with ServerProcess(command=serve_command("serve"), env=env) as server:
        yield Endpoint(server, port, base)


def error_of(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == status and isinstance(body["type"], str) and body["message"]
    return body


# -- in order: the server's state carries from one test to the next ----------------------------


def test_ping_is_200_with_no_model_and_invocations_points_to_invoke(endpoint: Endpoint) -> None:
    r = endpoint.call("GET", "/ping")
    assert r.status_code == 200 and r.content == b""
    assert endpoint.call("GET", "/models").json() == {"models": []}
    body = error_of(endpoint.call("POST", "/invocations", content=csv_of(SAMPLE[:1])), 400)
    assert "/models/NAME/invoke" in str(body["message"])


def test_loaded_models_serve_xgboosts_scores_and_labels_from_every_worker(
    endpoint: Endpoint,
) -> None:
    r = endpoint.load("probs", endpoint.probs)
    assert r.status_code == 200, r.text
    assert r.json()["modelName"] == "probs"
    assert endpoint.load("labels", endpoint.labels).status_code == 200
    for _ in range(FRESH):
        probs = endpoint.invoke("probs")
        assert probs.status_code == 200, probs.text
        np.testing.assert_allclose(scores_of(probs.text), WANT, atol=1e-6)
        labels = endpoint.invoke("labels")
        assert labels.status_code == 200, labels.text
        np.testing.assert_array_equal(scores_of(labels.text).astype(np.int32), WANT_LABELS)
    r = endpoint.call(
        "POST",
        "/models/probs/invoke",
        content=csv_of(SAMPLE[:2]),
        headers={"content-type": "text/csv", "accept": "application/json"},
    )
    assert r.status_code == 200
    got = [p["score"] for p in r.json()["predictions"]]
    np.testing.assert_allclose(got, WANT[:2], atol=1e-6)


def test_list_get_and_paginate(endpoint: Endpoint) -> None:
    listed = endpoint.call("GET", "/models").json()
    assert listed == {
        "models": [
            {"modelName": "labels", "modelUrl": str(endpoint.labels)},
            {"modelName": "probs", "modelUrl": str(endpoint.probs)},
        ]
    }
    first = endpoint.call("GET", "/models?limit=1").json()
    assert [m["modelName"] for m in first["models"]] == ["labels"]
    token = first["nextPageToken"]
    second = endpoint.call("GET", f"/models?limit=1&next_page_token={token}").json()
    assert [m["modelName"] for m in second["models"]] == ["probs"]
    assert "nextPageToken" not in second
    error_of(endpoint.call("GET", "/models?limit=0"), 400)
    error_of(endpoint.call("GET", "/models?next_page_token=x"), 400)
    r = endpoint.call("GET", "/models/probs")
    assert r.json() == {"modelName": "probs", "modelUrl": str(endpoint.probs)}


def test_refusals(endpoint: Endpoint) -> None:
    assert error_of(endpoint.load("probs", endpoint.probs), 409)["type"] == "model_already_loaded"
    error_of(endpoint.load("new", endpoint.base / "models" / "missing" / "model"), 404)
    error_of(endpoint.call("POST", "/models", content=b'{"model_name": "x", '), 400)
    error_of(endpoint.call("POST", "/models", json={"model_name": "x"}), 400)
    error_of(endpoint.call("POST", "/models", json=["x", "y"]), 400)
    error_of(endpoint.call("POST", "/models", json={"model_name": "a/b", "url": "/tmp"}), 400)
    for method, path in (
        ("POST", "/models/nope/invoke"),
        ("GET", "/models/nope"),
        ("DELETE", "/models/nope"),
    ):
        body = error_of(endpoint.call(method, path, content=b"1"), 404)
        assert body["type"] == "model_not_found" and "nope" in str(body["message"])
    # RTBSERVE_MAX_MODELS=2: a third model is refused as SageMaker expects, 507
    third = model_dir(endpoint.base, "third")
    assert error_of(endpoint.load("third", third), 507)["type"] == "insufficient_memory"


def test_grpc_sees_models_loaded_at_runtime(endpoint: Endpoint) -> None:
    from rtbserve.client import GrpcClient

    line = endpoint.server.wait_for(lambda s: s.startswith("listening on grpc://"))
    with GrpcClient(f"127.0.0.1:{port_of(line)}") as client:
        got = client.predict(SAMPLE[:3], model="probs")  # loaded in both workers by now
        np.testing.assert_allclose(got, WANT[:3], atol=1e-6)


def test_delete_unloads_from_every_worker_and_reload_works(endpoint: Endpoint) -> None:
    r = endpoint.call("DELETE", "/models/probs")
    assert r.status_code == 200, r.text
    for _ in range(FRESH):
        body = error_of(endpoint.invoke("probs"), 404)
        assert "labels" in str(body["message"])  # says what is loaded
        assert endpoint.invoke("labels").status_code == 200
    error_of(endpoint.call("GET", "/models/probs"), 404)
    assert [m["modelName"] for m in endpoint.call("GET", "/models").json()["models"]] == ["labels"]
    # two concurrent loads of one name (one per connection): one loads, the other is 409
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: endpoint.load("probs", endpoint.probs), range(2)))
    assert sorted(a.status_code for a in answers) == [200, 409]
    for _ in range(FRESH):
        r = endpoint.invoke("probs", SAMPLE[:4])
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(scores_of(r.text), WANT[:4], atol=1e-6)


def test_a_restarted_worker_serves_the_loaded_models_again(endpoint: Endpoint) -> None:
    victim = endpoint.server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    endpoint.server.wait_for(lambda line: "ready again" in line)
    for _ in range(FRESH):
        r = endpoint.invoke("labels", SAMPLE[:3])
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(scores_of(r.text).astype(np.int32), WANT_LABELS[:3])


def test_metrics_count_requests_per_model(endpoint: Endpoint) -> None:
    text = endpoint.call("GET", "/metrics").text

    def count(model: str, status: str) -> float:
        pattern = (
            rf'rtbserve_requests_total{{model="{model}",route="invocations",'
            rf'status="{status}"}} (\S+)'
        )
        m = re.search(pattern, text)
        return float(m.group(1)) if m else 0.0

    assert count("labels", "200") >= 2 * FRESH
    assert count("probs", "200") >= 2 * FRESH + 1
    assert count("", "404") >= FRESH + 1  # invokes of unloaded models
    assert "rtbserve_workers 2.0" in text


# -- in process: the environment, the registry, the memory bound -------------------------------


def test_environment_and_settings() -> None:
    env = sagemaker.parse_environment(
        {
            "SAGEMAKER_MULTI_MODEL": "true",
            "RTBSERVE_MAX_MODELS": "10",
            "RTBSERVE_MEMORY_BUDGET_MB": "2048",
        },
        cpus=2,
    )
    assert env.multi_model == MultiModelSettings(max_models=10, memory_budget_mb=2048)
    settings = sagemaker.server_settings(env, [])
    assert settings.models == () and settings.multi_model == env.multi_model
    assert settings_from_json(settings_to_json(settings)) == settings
    assert sagemaker.parse_environment({}).multi_model is None
    with pytest.raises(ConfigError, match="RTBSERVE_MAX_MODELS='0'"):
        sagemaker.parse_environment({"SAGEMAKER_MULTI_MODEL": "1", "RTBSERVE_MAX_MODELS": "0"})


class _StubModel:
    n_features, n_outputs, backend = 2, 1, "stub"

    def predict(self, rows: np.ndarray) -> np.ndarray:
        return rows[:, 0].copy()


def test_dataplane_remove_lets_requests_in_flight_finish() -> None:
    async def main() -> None:
        dp = DataPlane(multi_model=True)
        dp.mark_ready()
        assert dp.is_ready  # a multi-model worker is ready with no model
        served = dp.add(ModelSettings(name="m", path=Path("m")), _StubModel())
        with pytest.raises(ModelNotFound, match="no default model"):
            dp.get(None)  # every request names its model
        rows = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
        in_flight = asyncio.ensure_future(dp.predict(served, rows))
        await asyncio.sleep(0)  # queued on the model's micro-batcher
        assert dp.remove("m") is served
        with pytest.raises(ModelNotFound, match="loaded: none"):
            dp.get("m")
        scores, failed_open = await in_flight
        np.testing.assert_array_equal(scores, [1.0, 3.0])
        assert not failed_open

    asyncio.run(main())


def test_shared_registry_generations(tmp_path: Path) -> None:
    a, b = SharedRegistry(tmp_path), SharedRegistry(tmp_path)  # two workers
    try:
        assert a.read() == (0, {})
        entry = a.add("m", "/x", lambda entries: None)
        assert b.generation == 1 and b.read()[1] == {"m": entry}
        with pytest.raises(ModelAlreadyLoaded):
            b.add("m", "/y", lambda entries: None)
        b.remove("m")
        assert a.read() == (2, {})
        with pytest.raises(ModelNotFound):
            a.remove("m")
        again = b.add("m", "/x", lambda entries: None)
        assert again.load_id == 3 != entry.load_id  # a reload is told from the old copy
    finally:
        a.close()
        b.close()


def test_memory_budget_refuses_with_insufficient_memory(tmp_path: Path) -> None:
    url = model_dir(tmp_path, "m")

    async def main() -> None:
        registry = ModelRegistry(
            tmp_path / "run", DataPlane(multi_model=True), MultiModelSettings(memory_budget_mb=1)
        )
        try:
            with pytest.raises(InsufficientMemory, match="RTBSERVE_MEMORY_BUDGET_MB"):
                await registry.load("m", str(url))
            assert registry.entries == []
        finally:
            registry.close()

    (tmp_path / "run").mkdir()
    asyncio.run(main())
