"""rtbserve.metrics: worker processes write shared files, one render sums them exactly.

Real child processes write into one run directory (each its own slot); values are read back by
parsing the exposition with prometheus_client's own parser, so the format is checked too.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from rtbserve import metrics
from rtbserve.errors import ConfigError

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(directory: Path) -> Samples:
    """Every sample of one render, keyed by (sample name, sorted labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(metrics.render(directory).decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


# A worker: records `scale`-proportional traffic into slot argv[2], prints "ready", waits for a
# line on stdin, then exits cleanly ("close") or dies without cleanup ("crash").
_WORKER = """
import os, sys
from rtbserve import metrics as m
directory, slot, scale, queue_rows, exit_mode = sys.argv[1:]
slot, scale, queue_rows = int(slot), int(scale), int(queue_rows)
worker = m.WorkerMetrics(directory, slot)
xgb = worker.model("xgb")
for _ in range(scale):
    xgb.request(m.ROUTE_INVOCATIONS, 200)
    xgb.request(m.ROUTE_GRPC_PREDICT, "OK")
    xgb.observe_decode_s(4e-6)
    xgb.observe_queue_s(0.002)
    xgb.observe_predict_s(3e-5, 3)
    xgb.observe_encode_s(2.0)
worker.count_request("ping", "", 200)
xgb.count_shed(scale)
xgb.count_deadline_missed(2 * scale)
xgb.count_fail_open()
xgb.set_queue_rows(queue_rows)
print("ready", flush=True)
sys.stdin.readline()
if exit_mode == "crash":
    os._exit(0)
worker.close()
"""


class Worker:
    """One child process recording into a run directory."""

    def __init__(
        self, directory: Path, slot: int, scale: int, queue_rows: int, exit_mode: str
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(directory), str(slot), str(scale)]
            + [str(queue_rows), exit_mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # readiness signal, not a sleep
        if line.strip() != "ready":
            self.proc.kill()
            _, err = self.proc.communicate(timeout=60)
            pytest.fail(f"worker {slot} never got ready: {line!r}\n{err[-2000:]}")

    def stop(self) -> None:
        _, err = self.proc.communicate("\n", timeout=60)
        assert self.proc.returncode == 0, err[-2000:]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def spawn(run_dir: Path) -> Iterator[object]:
    started: list[Worker] = []

    def _spawn(slot: int, scale: int, queue_rows: int = 0, exit_mode: str = "close") -> Worker:
        worker = Worker(run_dir, slot, scale, queue_rows, exit_mode)
        started.append(worker)
        return worker

    yield _spawn
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.communicate(timeout=60)


def test_content_type_is_prometheus_latest() -> None:
    assert metrics.CONTENT_TYPE == CONTENT_TYPE_LATEST


def test_processes_sum_exactly(run_dir: Path, spawn) -> None:
    scales = {0: 3, 1: 5, 2: 11}
    workers = [spawn(slot, scale, queue_rows=10 * scale) for slot, scale in scales.items()]
    total = sum(scales.values())

    live = scrape(run_dir)
    assert value(live, "rtbserve_workers") == 3
    assert value(live, "rtbserve_queue_rows", model="xgb") == 10 * total
    for w in workers:
        w.stop()
    done = scrape(run_dir)
    assert value(done, "rtbserve_workers") == 0
    assert value(done, "rtbserve_queue_rows", model="xgb") == 0  # closed workers queue nothing

    for samples in (live, done):
        req = "rtbserve_requests_total"
        assert value(samples, req, route="invocations", model="xgb", status="200") == total
        assert value(samples, req, route="grpc_predict", model="xgb", status="OK") == total
        assert value(samples, req, route="ping", model="", status="200") == len(scales)
        assert value(samples, "rtbserve_shed_total", model="xgb") == total
        assert value(samples, "rtbserve_deadline_missed_total", model="xgb") == 2 * total
        assert value(samples, "rtbserve_fail_open_total", model="xgb") == len(scales)
        stage = "rtbserve_stage_seconds"
        for name, le in [("decode", "5e-06"), ("queue", "0.0025"), ("predict", "5e-05")]:
            assert value(samples, f"{stage}_bucket", model="xgb", stage=name, le=le) == total
        assert value(samples, f"{stage}_bucket", model="xgb", stage="encode", le="1.0") == 0
        assert value(samples, f"{stage}_bucket", model="xgb", stage="encode", le="+Inf") == total
        assert value(samples, f"{stage}_count", model="xgb", stage="queue") == total
        assert math.isclose(
            value(samples, f"{stage}_sum", model="xgb", stage="encode"), 2.0 * total
        )
        assert value(samples, "rtbserve_batch_rows_bucket", model="xgb", le="2.0") == 0
        assert value(samples, "rtbserve_batch_rows_bucket", model="xgb", le="4.0") == total
        assert value(samples, "rtbserve_batch_rows_sum", model="xgb") == 3 * total


def test_restarted_slot_continues_counters_and_owns_the_gauge(run_dir: Path, spawn) -> None:
    spawn(0, 4, queue_rows=7, exit_mode="crash").stop()  # dies without closing anything
    after_crash = scrape(run_dir)
    invocations = {"route": "invocations", "model": "xgb", "status": "200"}
    assert value(after_crash, "rtbserve_requests_total", **invocations) == 4
    # Its gauge stays in the file but a dead writer's gauge is not reported.
    assert value(after_crash, "rtbserve_queue_rows", model="xgb") == 0
    assert value(after_crash, "rtbserve_workers") == 0

    restarted = spawn(0, 6, queue_rows=3)
    live = scrape(run_dir)
    assert value(live, "rtbserve_requests_total", **invocations) == 10  # continued, not reset
    assert value(live, "rtbserve_shed_total", model="xgb") == 10
    assert value(live, "rtbserve_stage_seconds_count", model="xgb", stage="decode") == 10
    assert value(live, "rtbserve_queue_rows", model="xgb") == 3  # overwritten, not summed
    assert value(live, "rtbserve_workers") == 1
    restarted.stop()
    assert len(list(run_dir.glob("w*.bin"))) == 2  # one per (slot, model): "" and "xgb"


def test_reopened_slot_in_process_continues(run_dir: Path) -> None:
    with metrics.WorkerMetrics(run_dir, 3) as first:
        first.model("m").request(metrics.ROUTE_V2_INFER, 200)
        first.model("m").set_queue_rows(9)
    with metrics.WorkerMetrics(run_dir, 3) as second:
        assert value(scrape(run_dir), "rtbserve_queue_rows", model="m") == 0
        second.model("m").request(metrics.ROUTE_V2_INFER, 200)
        second.model("m").set_queue_rows(5)
        second.model("m").set_queue_rows(2)
        samples = scrape(run_dir)
    assert value(samples, "rtbserve_requests_total", route="v2_infer", model="m", status="200") == 2
    assert value(samples, "rtbserve_queue_rows", model="m") == 2


def test_slot_held_by_a_live_writer_is_refused(run_dir: Path) -> None:
    with metrics.WorkerMetrics(run_dir, 0), pytest.raises(ConfigError, match="same slot"):
        metrics.WorkerMetrics(run_dir, 0)


def test_histogram_buckets_are_cumulative(run_dir: Path) -> None:
    observed_s = [0.0, 5e-6, 5.1e-6, 1e-4, 0.3, 1.0, 1.5, 30.0]
    with metrics.WorkerMetrics(run_dir, 0) as worker:
        model = worker.model("m")
        for s in observed_s:
            model.observe_queue_s(s)
        for rows in (1, 3, 4096, 5000):
            model.observe_predict_s(1e-5, rows)
        samples = scrape(run_dir)

    def bucket(le: str) -> float | None:
        return value(samples, "rtbserve_stage_seconds_bucket", model="m", stage="queue", le=le)

    queue_buckets = {
        float(dict(labels)["le"]): got
        for (name, labels), got in samples.items()
        if name == "rtbserve_stage_seconds_bucket" and ("stage", "queue") in labels
    }
    assert sorted(queue_buckets) == [*metrics.STAGE_BOUNDS_S, math.inf]
    previous = 0.0
    for bound, got in sorted(queue_buckets.items()):
        assert got == sum(1 for s in observed_s if s <= bound), bound  # le is inclusive
        assert got >= previous
        previous = got
    assert bucket("5e-06") == 2
    assert bucket("+Inf") == len(observed_s)
    stage_count = value(samples, "rtbserve_stage_seconds_count", model="m", stage="queue")
    assert stage_count == len(observed_s)
    stage_sum = value(samples, "rtbserve_stage_seconds_sum", model="m", stage="queue")
    assert math.isclose(stage_sum, sum(observed_s))

    def rows_bucket(le: str) -> float | None:
        return value(samples, "rtbserve_batch_rows_bucket", model="m", le=le)

    les = ("1.0", "2.0", "4.0", "2048.0", "4096.0", "+Inf")
    assert [rows_bucket(le) for le in les] == [1, 1, 2, 2, 3, 4]
    assert value(samples, "rtbserve_batch_rows_count", model="m") == 4
    assert value(samples, "rtbserve_batch_rows_sum", model="m") == 1 + 3 + 4096 + 5000
    predict_count = value(samples, "rtbserve_stage_seconds_count", model="m", stage="predict")
    assert predict_count == 4


def test_unknown_status_and_route_count_as_other(run_dir: Path) -> None:
    with metrics.WorkerMetrics(run_dir, 0) as worker:
        model = worker.model("m")
        model.request(metrics.ROUTE_INVOCATIONS, 200)
        model.request(metrics.ROUTE_INVOCATIONS, "200")  # int and str are one label
        model.request(metrics.ROUTE_INVOCATIONS, 299)
        model.request(metrics.ROUTE_INVOCATIONS, "teapot")
        model.request(metrics.ROUTE_GRPC_MODEL_INFER, grpc.StatusCode.NOT_FOUND)
        model.request(metrics.ROUTE_GRPC_MODEL_INFER, "NOT_FOUND")
        worker.count_request("/no/such/route", "m", 404)
        worker.count_request("v2_metadata", "m", "UNAVAILABLE")
        worker.count_request(999, "m", 500)
        worker.count_request("ping", "never-opened", 200)  # unknown models go under ""
        samples = scrape(run_dir)
    assert metrics.route_index("nope") == metrics.ROUTE_OTHER
    req = "rtbserve_requests_total"
    assert value(samples, req, route="invocations", model="m", status="200") == 2
    assert value(samples, req, route="invocations", model="m", status="other") == 2
    assert value(samples, req, route="grpc_model_infer", model="m", status="NOT_FOUND") == 2
    assert value(samples, req, route="other", model="m", status="404") == 1
    assert value(samples, req, route="other", model="m", status="500") == 1
    assert value(samples, req, route="v2_metadata", model="m", status="UNAVAILABLE") == 1
    assert value(samples, req, route="ping", model="", status="200") == 1
    assert not any(labels and ("model", "never-opened") in labels for _, labels in samples)
    statuses = {dict(labels)["status"] for name, labels in samples if name == req}
    assert statuses <= set(metrics.STATUSES)


def test_model_added_later_appears_in_next_render(run_dir: Path) -> None:
    with metrics.WorkerMetrics(run_dir, 0) as worker:
        worker.model("first").request(metrics.ROUTE_INVOCATIONS, 200)
        before = scrape(run_dir)
        assert value(before, "rtbserve_shed_total", model="first") == 0
        assert value(before, "rtbserve_shed_total", model="later") is None
        later = worker.model('modèle "b"\\n')  # any name: labels are escaped by the renderer
        assert worker.model('modèle "b"\\n') is later
        later.count_fail_open()
        after = scrape(run_dir)
    assert value(after, "rtbserve_fail_open_total", model='modèle "b"\\n') == 1
    assert value(after, "rtbserve_shed_total", model="first") == 0
    # Nothing but request counts was recorded for model "": it gets no per-model series.
    assert value(after, "rtbserve_queue_rows", model="") is None


def test_render_skips_partial_and_foreign_files(run_dir: Path) -> None:
    (run_dir / "w7-partial-000000000000.bin").write_bytes(b"\0" * 40)
    (run_dir / "w8-foreign-000000000000.bin").write_bytes(b"x" * 4096)
    (run_dir / ".w0-m-000000000000.bin.123.tmp").write_bytes(b"\0" * 40)
    with metrics.WorkerMetrics(run_dir, 0) as worker:
        worker.model("m").count_shed()
        samples = scrape(run_dir)
    assert value(samples, "rtbserve_shed_total", model="m") == 1
    assert value(samples, "rtbserve_workers") == 1


def test_file_of_another_layout_is_skipped_then_started_over(run_dir: Path) -> None:
    with metrics.WorkerMetrics(run_dir, 0) as worker:
        worker.model("m").count_shed(5)
    (path,) = run_dir.glob("w0-m-*.bin")
    with path.open("r+b") as f:
        f.seek(8)  # the layout fingerprint, as if written by another rtbserve version
        f.write(b"\xff" * 8)
    assert value(scrape(run_dir), "rtbserve_shed_total", model="m") is None
    with metrics.WorkerMetrics(run_dir, 0) as worker:
        worker.model("m").count_shed()
        assert value(scrape(run_dir), "rtbserve_shed_total", model="m") == 1


def test_invalid_slot_or_name_is_a_config_error(run_dir: Path) -> None:
    with pytest.raises(ConfigError, match="slot"):
        metrics.WorkerMetrics(run_dir, -1)
    with pytest.raises(ConfigError, match="does not exist"):
        metrics.WorkerMetrics(run_dir / "missing", 0)
    with (
        metrics.WorkerMetrics(run_dir, 0) as worker,
        pytest.raises(ConfigError, match="too long"),
    ):
        worker.model("x" * (metrics.MAX_MODEL_NAME_BYTES + 1))


def test_create_run_dir_is_private_and_empty() -> None:
    directory = metrics.create_run_dir()
    try:
        assert list(directory.iterdir()) == []
        assert directory.stat().st_mode & 0o077 == 0
    finally:
        directory.rmdir()
