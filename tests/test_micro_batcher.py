"""The micro-batcher's policy, on a real event loop with a counting kernel."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rtbserve.batching import MicroBatcher
from rtbserve.errors import DeadlineExceeded, Overloaded


class CountingKernel:
    """score(rows) = row sums; records every call's row count."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.calls: list[int] = []
        self.delay_s = delay_s
        self.gate = gate

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            assert self.gate.wait(5), "test gate never opened"
        if self.delay_s:
            time.sleep(self.delay_s)
        self.calls.append(rows.shape[0])
        return rows.sum(axis=1)


def rows_of(*values: float) -> np.ndarray:
    return np.array([[v, 1.0] for v in values], dtype=np.float32)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def test_idle_request_is_scored_in_the_same_loop_iteration_without_timers():
    kernel = CountingKernel()

    async def main():
        b = MicroBatcher(kernel)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        got = await b.submit(rows_of(2.0))
        # no timer: the flush is a call_soon, so the answer comes within microseconds
        assert loop.time() - t0 < 0.05
        return got

    np.testing.assert_array_equal(run(main()), [3.0])
    assert kernel.calls == [1]


def test_requests_in_one_iteration_share_one_kernel_call_and_get_their_own_rows():
    kernel = CountingKernel()

    async def main():
        b = MicroBatcher(kernel)
        futs = [b.submit(rows_of(float(i), float(10 * i))) for i in range(50)]
        return await asyncio.gather(*futs)

    results = run(main())
    assert kernel.calls == [100]
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r, [i + 1.0, 10 * i + 1.0])


def test_batches_form_earliest_deadline_first_and_respect_max_rows():
    kernel = CountingKernel()
    order: list[float] = []

    async def main():
        b = MicroBatcher(kernel, max_batch_rows=2)
        now = time.monotonic()
        futs = {
            v: b.submit(rows_of(v), deadline=now + 10 - v)  # larger v = earlier deadline
            for v in (1.0, 2.0, 3.0, 4.0)
        }
        for v, f in futs.items():
            f.add_done_callback(lambda _f, v=v: order.append(v))
        await asyncio.gather(*futs.values())

    run(main())
    assert kernel.calls == [2, 2]
    assert sorted(order[:2]) == [3.0, 4.0]  # the two earliest deadlines went first
    assert sorted(order[2:]) == [1.0, 2.0]


def test_requests_without_a_deadline_go_after_every_deadline_in_arrival_order():
    kernel = CountingKernel()
    order: list[float] = []

    async def main():
        b = MicroBatcher(kernel, max_batch_rows=2)
        now = time.monotonic()
        futures = [
            b.submit(rows_of(1.0)),  # no deadline
            b.submit(rows_of(2.0), deadline=now + 9),
            b.submit(rows_of(3.0)),  # no deadline
            b.submit(rows_of(4.0), deadline=now + 5),  # the earliest deadline
            b.submit(rows_of(5.0)),  # no deadline
        ]
        for fut in asyncio.as_completed(futures):
            order.append(float((await fut)[0]) - 1.0)

    run(main())
    # batches of 2 rows: the two deadlines (earliest first), then the rest as they came
    assert kernel.calls == [2, 2, 1]
    assert order[:2] in ([4.0, 2.0], [2.0, 4.0]) and order[2:4] in ([1.0, 3.0], [3.0, 1.0])
    assert order[4] == 5.0


def test_expired_request_is_not_computed():
    kernel = CountingKernel()
    clock = {"now": 100.0}

    async def main():
        b = MicroBatcher(kernel, clock=lambda: clock["now"])
        late = b.submit(rows_of(1.0), deadline=100.5)
        fine = b.submit(rows_of(2.0), deadline=200.0)
        clock["now"] = 101.0  # time passes before the flush runs
        with pytest.raises(DeadlineExceeded):
            await late
        np.testing.assert_array_equal(await fine, [3.0])
        with pytest.raises(DeadlineExceeded):
            b.submit(rows_of(3.0), deadline=50.0)  # already past on arrival
        return b.stats

    stats = run(main())
    assert kernel.calls == [1]  # only the request that could still make it
    assert stats.deadline_misses == 2


def test_queue_bound_sheds_at_once():
    kernel = CountingKernel()

    async def main():
        b = MicroBatcher(kernel, max_queue_rows=3)
        accepted = [b.submit(rows_of(float(i))) for i in range(3)]
        assert b.would_shed(1)
        with pytest.raises(Overloaded, match="queue full"):
            b.submit(rows_of(9.0))
        await asyncio.gather(*accepted)
        assert not b.would_shed(1)  # drained
        return b.stats.shed

    assert run(main()) == 1
    assert kernel.calls == [3]


def test_arrivals_gather_while_a_large_batch_runs_in_a_thread():
    gate = threading.Event()
    kernel = CountingKernel(gate=gate)

    async def main():
        with ThreadPoolExecutor(1) as pool:
            b = MicroBatcher(kernel, inline_max_rows=8, max_batch_delay_us=0, executor=pool)
            big = b.submit(np.ones((100, 2), dtype=np.float32))
            await asyncio.sleep(0)  # the big batch is now in the executor, blocked on the gate
            small = [b.submit(rows_of(float(i))) for i in range(5)]
            await asyncio.sleep(0.01)
            assert kernel.calls == []  # still busy: nothing else ran
            gate.set()
            await big
            return await asyncio.gather(*small)

    results = run(main())
    assert kernel.calls == [100, 5]  # the five arrivals went together, after the big one
    assert [float(r[0]) for r in results] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_kernel_error_reaches_only_its_batch_and_the_batcher_keeps_serving():
    calls = {"n": 0}

    def flaky(rows: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return rows.sum(axis=1)

    async def main():
        b = MicroBatcher(flaky)
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(rows_of(1.0))
        return await b.submit(rows_of(5.0))

    np.testing.assert_array_equal(run(main()), [6.0])


def test_cancelled_request_is_skipped():
    kernel = CountingKernel()

    async def main():
        b = MicroBatcher(kernel)
        gone = b.submit(rows_of(1.0))
        gone.cancel()
        kept = b.submit(rows_of(2.0))
        return await kept

    np.testing.assert_array_equal(run(main()), [3.0])
    assert kernel.calls == [1]
