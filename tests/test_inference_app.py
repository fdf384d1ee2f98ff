"""The HTTP app's Accept handling: negotiated once per header value, 406 every time."""

from __future__ import annotations

import pytest

from rtbserve.dataplane import DataPlane
from rtbserve.errors import NotAcceptable
from rtbserve.metrics import WorkerMetrics
from rtbserve.transports.http.inference_app import InferenceApp


def test_accept_is_negotiated_and_refusals_repeat(tmp_path):
    app = InferenceApp(DataPlane(), WorkerMetrics(tmp_path, 0))
    assert app._accept(None) == "text/csv"
    assert app._accept("application/json, text/csv;q=0.5") == "application/json"
    assert app._accept("application/json, text/csv;q=0.5") == "application/json"  # cached
    for _ in range(2):  # a refusal is never cached as an answer
        with pytest.raises(NotAcceptable, match="text/csv"):
            app._accept("image/png")
