"""Open Inference Protocol (KServe v2) REST payloads <-> feature matrices and scores.

Request: ``{"id"?, "parameters"?, "inputs": [{"name", "shape", "datatype", "data"?,
"parameters"?}], "outputs"?: [{"name", "parameters"?}]}``. The one input is the (n, F) feature
matrix (a shape of [F] is one row). ``data`` may be flat or nested; ``null`` and ``NaN`` are
missing values.
The binary tensor extension (what ``tritonclient.http`` sends by default) is supported: the JSON
header's length is in the ``Inference-Header-Content-Length`` HTTP header, an input's bytes follow
it (``"parameters": {"binary_data_size": N}``), and an output requested with
``"parameters": {"binary_data": true}`` (or request parameter ``binary_data_output``) is sent as raw
little-endian bytes after the JSON response header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from rtbserve.errors import InvalidInput, UnsupportedMediaType

OUTPUT_NAME = "output-0"
# datatype -> numpy dtype (little-endian, as the protocol's binary form requires)
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_F32 = np.dtype(np.float32)


@dataclass(slots=True)
class OipRequest:
    rows: np.ndarray  # float32 (n, F), C-contiguous
    id: str | None
    output_binary: bool  # send output-0 as binary data


def parse_oip_request(body: bytes, n_features: int, header_length: int | None = None) -> OipRequest:
    """Decode an infer request body for a model of ``n_features`` features.

    header_length: the ``Inference-Header-Content-Length`` value when the binary extension is
    used (the JSON header is ``body[:header_length]``, binary inputs follow in order).
    """
    if header_length is not None and not 0 < header_length <= len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length {header_length} does not fit a body of "
            f"{len(body)} bytes"
        )
    head = body if header_length is None else body[:header_length]
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        doc = _loads_with_nan(head, exc)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise InvalidInput('infer request must be a JSON object with an "inputs" list')
    inputs = doc["inputs"]
    if len(inputs) != 1:
        raise InvalidInput(
            f"expected exactly 1 input (the feature matrix [rows, {n_features}]), got {len(inputs)}"
        )
    spec = inputs[0]
    if not isinstance(spec, dict):
        raise InvalidInput("each input must be an object with name, shape, datatype and data")
    rows = _input_rows(spec, n_features, body[header_length:] if header_length else None)
    output_binary = _wants_binary(doc, n_features)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f'"id" must be a string, got {orjson.dumps(request_id).decode()}')
    return OipRequest(rows, request_id, output_binary)


def _loads_with_nan(head: bytes, exc: orjson.JSONDecodeError) -> Any:
    # Python's json.dumps (tritonclient's encoder) writes NaN/Infinity, which strict JSON lacks
    import json

    try:
        return json.loads(head)
    except (ValueError, UnicodeDecodeError):
        raise UnsupportedMediaType(f"infer request is not valid JSON: {exc}") from None


def _input_rows(spec: dict[str, Any], n_features: int, binary: bytes | None) -> np.ndarray:
    name = spec.get("name", "input-0")
    datatype = spec.get("datatype")
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidInput(
            f"input {name!r}: unsupported datatype {datatype!r}; "
            f"expected one of {', '.join(DATATYPES)}"
        )
    shape = spec.get("shape")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise InvalidInput(
            f"input {name!r}: shape must be [rows, {n_features}] or [{n_features}], got {shape!r}"
        )
    if shape[-1] != n_features:
        raise InvalidInput(f"input {name!r}: expected {n_features} features, got {shape[-1]}")
    n_rows = shape[0] if len(shape) == 2 else 1
    if n_rows == 0:
        raise InvalidInput(f"input {name!r}: no rows")
    count = n_rows * n_features
    params = spec.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if binary is None:
            raise InvalidInput(
                f"input {name!r} has binary_data_size but the request has no "
                "Inference-Header-Content-Length header"
            )
        if size != count * dtype.itemsize or len(binary) != size:
            raise InvalidInput(
                f"input {name!r}: expected {count * dtype.itemsize} bytes of {datatype} for shape "
                f"{shape}, got binary_data_size {size} and {len(binary)} bytes after the header"
            )
        values = np.frombuffer(binary, dtype=dtype)
    else:
        data = spec.get("data")
        if not isinstance(data, list):
            raise InvalidInput(f'input {name!r}: "data" must be a list of {datatype} values')
        values = _json_values(name, data, count)
    rows = values.reshape(n_rows, n_features)
    if rows.dtype != _F32 or not rows.flags.c_contiguous:
        rows = np.ascontiguousarray(rows, dtype=_F32)
    return rows


def _json_values(name: str, data: list[Any], count: int) -> np.ndarray:
    flat = data
    while flat and isinstance(flat[0], list):  # nested (row-major) form
        flat = [v for part in flat for v in part]
    if len(flat) != count:
        raise InvalidInput(f"input {name!r}: shape needs {count} values, data has {len(flat)}")
    try:
        return np.array(flat, dtype=np.float64)  # null -> NaN
    except (TypeError, ValueError):
        for i, v in enumerate(flat):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                raise InvalidInput(
                    f"input {name!r}: value {i} is {orjson.dumps(v).decode()[:40]}, "
                    "not a number or null"
                ) from None
        raise


def _wants_binary(doc: dict[str, Any], n_features: int) -> bool:
    binary = bool((doc.get("parameters") or {}).get("binary_data_output", False))
    outputs = doc.get("outputs")
    if outputs is None:
        return binary
    if not isinstance(outputs, list):
        raise InvalidInput('"outputs" must be a list of {"name": ...} objects')
    for out in outputs:
        name = out.get("name") if isinstance(out, dict) else None
        if name != OUTPUT_NAME:
            raise InvalidInput(f"unknown output {name!r}; this model has: {OUTPUT_NAME}")
        params = out.get("parameters") or {}
        if isinstance(params, dict) and "binary_data" in params:
            binary = bool(params["binary_data"])
    return binary


def encode_oip_response(
    model_name: str,
    scores: np.ndarray,
    request: OipRequest,
    *,
    failed_open: bool = False,
    out_dtype: str = "FP32",
) -> tuple[bytes, int | None]:
    """The infer response; returns (body, json_header_length or None when all JSON).

    out_dtype: the model's declared output datatype (``INT32`` for labels), kept even when a
    fail-open default decision is answered."""
    np_type = DATATYPES[out_dtype]
    values = np.ascontiguousarray(scores, dtype=np_type)
    output: dict[str, Any] = {
        "name": OUTPUT_NAME,
        "datatype": out_dtype,
        "shape": list(values.shape),
    }
    doc: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": [output]}
    if request.id is not None:
        doc["id"] = request.id
    if failed_open:
        doc["parameters"] = {"fail_open": True}
    if request.output_binary:
        raw = values.tobytes()
        output["parameters"] = {"binary_data_size": len(raw)}
        head = orjson.dumps(doc)
        return head + raw, len(head)
    output["data"] = values.ravel()  # orjson writes numpy arrays natively; NaN -> null
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), None


def server_metadata(version: str) -> bytes:
    return orjson.dumps({"name": "rtbserve", "version": version, "extensions": ["binary_data"]})
