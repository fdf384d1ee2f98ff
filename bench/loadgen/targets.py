"""What the load generator sends: a target (transport, address, payload) and its encoded bytes.

Payloads are encoded once, before the run, so the hot path only writes bytes: the HTTP request is
one pre-built ``bytes`` object, and gRPC messages are a pre-serialised ``PredictRequest`` to which
the stream path appends a ``request_id`` field (protobuf allows fields in any order). Targets are
plain picklable data: they travel to the load processes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
DEMO_SAMPLE = REPO / "models" / "rtb-filter" / "sample.csv"
PROTO_DIR = REPO / "proto"
PROTO_FILE = PROTO_DIR / "rtbserve" / "v1" / "predictor.proto"
PREDICT_METHOD = "/rtbserve.v1.Predictor/Predict"
STREAM_METHOD = "/rtbserve.v1.Predictor/PredictStream"
KINDS = ("http", "grpc", "grpc-stream")


def demo_csv_row(index: int = 0) -> str:
    """Row ``index`` of the demo model's sample (67 features, no header, no label column)."""
    lines = [ln for ln in DEMO_SAMPLE.read_text().splitlines() if ln.strip()]
    return lines[index % len(lines)]


def csv_row_to_floats(line: str) -> list[float]:
    """One CSV line -> floats; an empty cell is NaN (missing), as rtbserve reads it."""
    return [float(c) if c.strip() else float("nan") for c in line.split(",")]


@dataclass(frozen=True)
class Target:
    """Where the load goes and what every request carries.

    kind: ``http`` (POST ``body`` to ``path``), ``grpc`` (unary ``Predict``) or ``grpc-stream``
    (``PredictStream``, one message per request on long-lived streams).
    host: a loopback address only (the load generator refuses anything else).
    headers: extra HTTP headers (content-type and content-length are set from the body).
    rows / n_features / model: the gRPC ``PredictRequest`` fields.
    """

    kind: str
    port: int
    host: str = "127.0.0.1"
    path: str = "/invocations"
    body: bytes = b""
    content_type: str = "text/csv"
    headers: tuple[tuple[str, str], ...] = (("accept", "text/csv"),)
    rows: tuple[float, ...] = ()
    n_features: int = 0
    model: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown target kind {self.kind!r}; choose from {', '.join(KINDS)}")
        host = "127.0.0.1" if self.host == "localhost" else self.host
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"targets must be loopback addresses (127.0.0.0/8, ::1), got {host!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"expected a port in 1..65535, got {self.port}")

    def describe(self) -> str:
        if self.kind == "http":
            return f"http://{self.host}:{self.port}{self.path} ({len(self.body)} B body)"
        method = PREDICT_METHOD if self.kind == "grpc" else STREAM_METHOD
        return f"grpc://{self.host}:{self.port}{method} ({len(self.rows)} floats)"


def demo_http_target(port: int, host: str = "127.0.0.1") -> Target:
    """POST one demo CSV row to ``/invocations`` (text/csv in, text/csv out)."""
    return Target("http", port, host, body=(demo_csv_row() + "\n").encode())


def demo_grpc_target(port: int, *, stream: bool = False, host: str = "127.0.0.1") -> Target:
    """One demo row as a ``PredictRequest`` (default model, 67 features)."""
    rows = tuple(csv_row_to_floats(demo_csv_row()))
    return Target("grpc-stream" if stream else "grpc", port, host, rows=rows, n_features=len(rows))


def http_request_bytes(t: Target) -> bytes:
    """The complete HTTP/1.1 request, written as-is for every request on a keep-alive connection."""
    lines = [
        f"POST {t.path} HTTP/1.1",
        f"host: {t.host}:{t.port}",
        f"content-type: {t.content_type}",
        f"content-length: {len(t.body)}",
        *(f"{k}: {v}" for k, v in t.headers),
    ]
    for ln in lines:
        if "\r" in ln or "\n" in ln:
            raise ValueError(f"header line contains CR or LF: {ln!r}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + t.body


def grpc_request_base(t: Target) -> bytes:
    """``PredictRequest`` without ``request_id``; append ``request_id_field(...)`` per message."""
    pb2 = predictor_pb2()
    msg = pb2.PredictRequest(model=t.model, rows=list(t.rows), n_features=t.n_features)
    return msg.SerializeToString()


def request_id_field(request_id: bytes) -> bytes:
    """Protobuf field 2 (``request_id``, length-delimited) for ids shorter than 128 bytes."""
    return b"\x12" + bytes((len(request_id),)) + request_id


# --------------------------------------------------------------------------- generated protobuf

_PB2: ModuleType | None = None


def predictor_pb2() -> ModuleType:
    """The generated ``predictor_pb2`` module: rtbserve's own, or a private copy made from proto/.

    rtbserve ships its generated code in ``rtbserve._proto``; until a checkout has it, a copy is
    generated once with grpc_tools into the temp dir (keyed by the .proto's hash) and loaded from
    there under a private module name.
    """
    global _PB2
    if _PB2 is not None:
        return _PB2
    try:
        from rtbserve._proto import predictor_pb2 as mod  # type: ignore[attr-defined]
    except ImportError:
        mod = _private_pb2()
    _PB2 = mod
    return mod


def _private_pb2() -> ModuleType:
    digest = hashlib.sha256(PROTO_FILE.read_bytes()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"rtbserve-bench-pb-{digest}"
    path = out / "rtbserve" / "v1" / "predictor_pb2.py"
    if not path.is_file():
        from grpc_tools import protoc

        scratch = Path(tempfile.mkdtemp(prefix="rtbserve-bench-pb-"))
        rc = protoc.main(
            ["protoc", f"-I{PROTO_DIR}", f"--python_out={scratch}", str(PROTO_FILE)]
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed ({rc}) on {PROTO_FILE}")
        try:
            os.replace(scratch, out)  # atomic: concurrent processes see all of it or nothing
        except OSError:
            if not path.is_file():
                raise
    name = "_rtbserve_bench_predictor_pb2"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
