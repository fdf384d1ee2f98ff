"""Regenerate the golden /invocations payloads in this directory (5 rows of the demo model).

Requests in the SageMaker SDK's own binary encodings come from the SDK itself, responses from
rtbserve, and the RecordIO responses are read back with the SDK's reader. Three steps, two
Python environments (the SDK pins versions the dev venv must not get; it is never a dependency):

    python3 -m venv /tmp/sm && /tmp/sm/bin/pip install "sagemaker<3" numpy scipy
    /tmp/sm/bin/python tests/data/sagemaker/make_golden.py requests   # CSV, LIBSVM, JSON(L),
                                                                      # RecordIO (SDK), npy
    .venv/bin/python tests/data/sagemaker/make_golden.py responses    # Arrow, Parquet requests;
                                                                      # every response
    /tmp/sm/bin/python tests/data/sagemaker/make_golden.py check      # SDK reads the responses

Files: ``request.<ext>`` per content type; ``response.<ext>`` per Accept for the plain answers;
``selected.<ext>`` for ``SAGEMAKER_INFERENCE_OUTPUT=SELECTED`` below; ``expected.json`` holds
the rows (null = missing), the scores and the selected keys, for the tests' own checks.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent.parent
DEMO = ROOT / "models" / "rtb-filter"
ROWS = (0, 1, 2, 14, 18)  # sample.csv lines (0-based): three no-bids, two bids (p >= 0.5)
N_ROWS = len(ROWS)
SELECTED = "predicted_label,probability,probabilities,raw_score,labels"
REQUESTS = {  # content type -> file
    "text/csv": "request.csv",
    "text/libsvm": "request.libsvm",
    "application/json": "request.json",
    "application/jsonlines": "request.jsonl",
    "application/x-recordio-protobuf": "request.recordio",
    "application/x-npy": "request.npy",
    "application/vnd.apache.arrow.stream": "request.arrow",
    "application/x-parquet": "request.parquet",
}
EXTRA_REQUESTS = {  # more encodings of the same rows
    "application/x-recordio-protobuf": ["request_f64.recordio", "request_sparse.recordio"],
}
RESPONSES = {  # Accept -> extension
    "text/csv": "csv",
    "application/json": "json",
    "application/jsonlines": "jsonl",
    "application/x-recordio-protobuf": "recordio",
    "application/x-npy": "npy",
}


def sample_tokens() -> list[list[str]]:
    lines = (DEMO / "sample.csv").read_text().splitlines()
    return [lines[i].split(",") for i in ROWS]


def sample_rows() -> np.ndarray:
    tokens = sample_tokens()
    return np.array(
        [[float(t) if t else np.nan for t in row] for row in tokens], dtype=np.float64
    ).astype(np.float32)


def make_requests() -> None:
    import scipy.sparse as sp
    from sagemaker.amazon.common import (
        write_numpy_to_dense_tensor,
        write_spmatrix_to_sparse_tensor,
    )

    tokens = sample_tokens()
    X = sample_rows()  # noqa: N806
    (HERE / "request.csv").write_text("\n".join(",".join(row) for row in tokens) + "\n")
    libsvm = [
        "0 " + " ".join(f"{j}:{t}" for j, t in enumerate(row) if t)  # label 0, ignored
        for row in tokens
    ]
    (HERE / "request.libsvm").write_text("\n".join(libsvm) + "\n")
    json_rows = ["[" + ",".join(t or "null" for t in row) + "]" for row in tokens]
    (HERE / "request.json").write_text('{"instances": [' + ", ".join(json_rows) + "]}\n")
    # JSON Lines: every one-row form, one per line
    forms = [
        json_rows[0],
        '{"features": ' + json_rows[1] + "}",
        '{"instances": [' + json_rows[2] + "]}",
        json_rows[3],
        json_rows[4],
    ]
    (HERE / "request.jsonl").write_text("\n".join(forms) + "\n")
    buf = io.BytesIO()
    write_numpy_to_dense_tensor(buf, X, labels=np.zeros(N_ROWS, dtype=np.float32))
    (HERE / "request.recordio").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    write_numpy_to_dense_tensor(buf, X.astype(np.float64))
    (HERE / "request_f64.recordio").write_bytes(buf.getvalue())
    present = ~np.isnan(X)
    r, c = np.nonzero(present)
    # explicit zeros stay: a sparse record's absent column is missing, not 0
    sparse = sp.csr_matrix((X[present], (r, c)), shape=X.shape, dtype=np.float32)
    buf = io.BytesIO()
    write_spmatrix_to_sparse_tensor(buf, sparse)
    (HERE / "request_sparse.recordio").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, X)
    (HERE / "request.npy").write_bytes(buf.getvalue())


def make_responses() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import xgboost as xgb

    import rtbserve
    from rtbserve.codecs import encode_scores
    from rtbserve.codecs.selection import OutputSelection, parse_inference_output

    X = sample_rows()  # noqa: N806
    table = pa.table({f"f{j}": X[:, j] for j in range(X.shape[1])})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (HERE / "request.arrow").write_bytes(sink.getvalue().to_pybytes())
    buf = io.BytesIO()
    pq.write_table(table, buf)
    (HERE / "request.parquet").write_bytes(buf.getvalue())

    cache = Path("/tmp/rtbserve-golden-cache")
    model = rtbserve.load_model(DEMO, backend="numba", cache_dir=cache)
    scores = model.predict(X)
    reference = xgb.Booster(model_file=str(DEMO / "model.json")).inplace_predict(X)
    assert np.abs(scores - reference).max() < 1e-6, (scores, reference)
    for accept, ext in RESPONSES.items():
        (HERE / f"response.{ext}").write_bytes(encode_scores(scores, accept)[0])
    selection = OutputSelection(
        parse_inference_output(SELECTED),
        objective=model.objective,
        n_outputs=model.n_outputs,
        is_classifier=model.meta.output.is_classifier,
        threshold=model.threshold,
    )
    for accept, ext in RESPONSES.items():
        if accept != "application/x-npy":
            (HERE / f"selected.{ext}").write_bytes(selection.encoder(accept)(scores))
    expected = {
        "rows": [[None if np.isnan(v) else float(v) for v in row] for row in X],
        "scores": [float(s) for s in scores],
        "threshold": model.threshold,
        "selected": SELECTED,
    }
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


def check_responses() -> None:
    from sagemaker.amazon.common import read_records

    expected = json.loads((HERE / "expected.json").read_text())
    scores = np.array(expected["scores"], dtype=np.float32)
    with open(HERE / "response.recordio", "rb") as f:
        records = read_records(f)
    got = [r.label["score"].float32_tensor.values[0] for r in records]
    np.testing.assert_array_equal(np.array(got, dtype=np.float32), scores)
    with open(HERE / "selected.recordio", "rb") as f:
        records = read_records(f)
    for record, p in zip(records, scores, strict=True):
        label = {k: list(v.float32_tensor.values) for k, v in record.label.items()}
        assert label["probability"] == [p] and label["raw_score"] == [p], label
        assert label["predicted_label"] == [float(p >= expected["threshold"])], label
        assert label["probabilities"] == [np.float32(1) - p, p] and label["labels"] == [0, 1]
    print(f"SDK reader: {len(scores)} rows of response.recordio and selected.recordio agree")


if __name__ == "__main__":
    steps = {"requests": make_requests, "responses": make_responses, "check": check_responses}
    if len(sys.argv) != 2 or sys.argv[1] not in steps:
        raise SystemExit(f"usage: make_golden.py {{{'|'.join(steps)}}}")
    steps[sys.argv[1]]()
