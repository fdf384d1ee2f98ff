"""A Flask app that does per request what the SageMaker XGBoost container's app does.

Written for ``bench.sagemaker`` from the container's documented behaviour (algorithm mode,
``text/csv``), not from its code. Per ``POST /invocations``:

1. empty body -> 204;
2. strip the payload, decode UTF-8, and sniff the delimiter with ``csv.Sniffer().sniff`` on the
   first line's first 512 characters (an alphanumeric "delimiter" means ``,``), logging it at
   INFO: the per-request log line;
3. split lines and fields, turn empty fields into ``"nan"``, ``np.array(...).astype(float64)``;
4. build an ``xgboost.DMatrix`` and call ``Booster.predict(..., validate_features=False)`` on a
   booster loaded once per worker with ``nthread=1``;
5. answer one score per line (``text/csv``), as the container does in batch mode
   (``SAGEMAKER_BATCH``; for one row it is the same bytes either way).

A payload that fails steps 2-3 is 415, a predict failure 400, as there.

Importing this module needs numpy only (the tests run ``parse_csv`` in rtbserve's venv);
Flask and xgboost are imported by ``create_app``, which gunicorn calls once per worker:
``gunicorn 'app:create_app()'`` with ``SAGEMAKER_STACK_MODEL`` naming the model file.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import logging
import os
from typing import Any

import numpy as np

MAX_CONTENT_LENGTH = 6 * 1024 * 1024  # SageMaker's real-time payload limit, as the container
SNIFF_CHARS = 512
LOG_FORMAT = "[%(asctime)s:%(levelname)s] %(message)s"
READY_FD_ENV = "SAGEMAKER_STACK_READY_FD"

log = logging.getLogger("sagemaker_stack")


def sniff_delimiter(text: str) -> str:
    """The delimiter ``csv.Sniffer`` finds in the first line's first 512 characters.

    An alphanumeric answer (the sniffer's guess on a line with no separator at all) means
    ``,``. Raises ``csv.Error`` when the sniffer finds nothing.
    """
    first = text.split("\n", 1)[0][:SNIFF_CHARS]
    delimiter = csv.Sniffer().sniff(first).delimiter
    return "," if delimiter.isalnum() else delimiter


def parse_csv(payload: bytes) -> np.ndarray:
    """A CSV body -> a float64 ``(rows, columns)`` array; empty fields are NaN.

    Logs the sniffed delimiter at INFO (one line per call). Raises ``csv.Error``,
    ``UnicodeDecodeError`` or ``ValueError`` (a non-numeric field, ragged rows) on a bad body.
    """
    text = payload.strip().decode("utf-8")
    delimiter = sniff_delimiter(text)
    log.info("Determined delimiter of CSV input is '%s'", delimiter)
    rows = [
        ["nan" if field == "" else field for field in line.split(delimiter)]
        for line in text.split("\n")
    ]
    return np.array(rows).astype(np.float64)


def format_scores(scores: np.ndarray) -> str:
    """One score per line, newline-terminated (Python's shortest repr of each float)."""
    return "".join(f"{s}\n" for s in scores.tolist())


def load_booster(path: str) -> Any:
    import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(path)
    booster.set_param("nthread", 1)
    return booster


def create_app(model_path: str | None = None) -> Any:
    """The Flask app with ``/ping`` and ``/invocations`` (the booster is loaded here)."""
    import flask
    import xgboost as xgb

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    path = model_path or os.environ["SAGEMAKER_STACK_MODEL"]
    booster = load_booster(path)
    log.info("Model loaded successfully for worker : %d", os.getpid())
    ready_fd = os.environ.get(READY_FD_ENV)
    if ready_fd:  # serve.py counts one byte per loaded worker
        with contextlib.suppress(OSError):
            os.write(int(ready_fd), b"R")

    app = flask.Flask("sagemaker_stack")
    app.config["MAX_CONTENT_LENGTH"] = MAX_CONTENT_LENGTH

    @app.route("/ping", methods=["GET"])
    def ping() -> Any:
        return flask.Response(status=http.client.OK)

    @app.route("/invocations", methods=["POST"])
    def invocations() -> Any:
        payload = flask.request.get_data()
        if not payload:
            return flask.Response(response="", status=http.client.NO_CONTENT)
        content_type = (flask.request.content_type or "text/csv").split(";")[0].strip().lower()
        if content_type != "text/csv":
            return flask.Response(
                response=f"Content-type {content_type} not supported (text/csv only here)",
                status=http.client.UNSUPPORTED_MEDIA_TYPE,
            )
        try:
            dtest = xgb.DMatrix(parse_csv(payload))
        except Exception as exc:
            log.exception(exc)
            return flask.Response(
                response=f"Loading csv data failed: {type(exc).__name__}: {exc}",
                status=http.client.UNSUPPORTED_MEDIA_TYPE,
            )
        try:
            scores = booster.predict(dtest, validate_features=False)
        except Exception as exc:
            log.exception(exc)
            return flask.Response(
                response=f"Unable to evaluate payload provided: {exc}",
                status=http.client.BAD_REQUEST,
            )
        return flask.Response(
            response=format_scores(scores), status=http.client.OK, mimetype="text/csv"
        )

    return app
