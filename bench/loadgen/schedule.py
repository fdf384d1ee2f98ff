"""When requests are due: arrival schedules, and a nanosecond wake-up for the event loop.

An open-loop run fixes every request's intended send time before the run starts. Process ``k``
of ``P`` sends its share of the total rate: with fixed-interval arrivals it takes every P-th slot
of the global grid (offset ``k / rate``), so the merged stream is exactly periodic; with Poisson
arrivals each process draws independent exponential gaps at ``rate / P``, and independent
Poisson streams merge into one at ``rate``.

The loop's own timers are no good for this: libuv (uvloop) and epoll keep millisecond time, so a
``call_at`` fires up to ~1 ms late and would add that to every latency. ``Waker`` arms a Linux
``timerfd`` at the absolute CLOCK_MONOTONIC time (``time.monotonic_ns``'s clock) and watches it
with ``add_reader``: epoll wakes when the fd turns readable, with the kernel's timer precision.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import random
import time
from collections.abc import Callable

ARRIVALS = ("fixed", "poisson")

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1


def arrival_times_ns(
    start_ns: int,
    duration_s: float,
    rate: float,
    *,
    arrivals: str = "fixed",
    proc_index: int = 0,
    procs: int = 1,
    seed: int = 0,
) -> list[int]:
    """Intended send times (monotonic ns) in ``[start_ns, start_ns + duration_s)`` for one process.

    rate: the total over all ``procs`` processes, requests/s; this process gets ``rate / procs``.
    arrivals: ``fixed`` (this process's slots of a global grid of period ``1 / rate``) or
    ``poisson`` (exponential gaps, seeded by ``seed`` and ``proc_index``).
    """
    if rate <= 0:
        raise ValueError(f"expected a rate > 0 requests/s, got {rate}")
    if arrivals not in ARRIVALS:
        raise ValueError(f"unknown arrivals {arrivals!r}; choose from {', '.join(ARRIVALS)}")
    end_ns = start_ns + int(duration_s * 1e9)
    if arrivals == "fixed":
        period_ns = 1e9 / rate
        n_total = int(duration_s * rate)
        return [start_ns + int(i * period_ns) for i in range(proc_index, n_total, procs)]
    rng = random.Random(seed * 1_000_003 + proc_index)
    mean_gap_ns = 1e9 * procs / rate
    times: list[int] = []
    t = float(start_ns)
    while True:
        t += rng.expovariate(1.0) * mean_gap_ns
        if t >= end_ns:
            return times
        times.append(int(t))


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


class Waker:
    """Calls ``callback()`` on ``loop`` at an absolute ``time.monotonic_ns()`` time (timerfd).

    One pending wake-up at a time: ``arm`` replaces the previous one. Linux only; elsewhere it
    falls back to ``loop.call_at`` (millisecond precision). Not thread-safe: loop thread only.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._spec = _Itimerspec()
        self._fd = -1
        try:
            self._libc = ctypes.CDLL(None, use_errno=True)
            fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        except (OSError, AttributeError):
            fd = -1
        if fd >= 0:
            self._fd = fd
            loop.add_reader(fd, self._on_readable)

    @property
    def is_precise(self) -> bool:
        return self._fd >= 0

    def arm(self, when_ns: int) -> None:
        if self._fd < 0:
            if self._handle is not None:
                self._handle.cancel()
            delay = max(0.0, (when_ns - time.monotonic_ns()) / 1e9)
            self._handle = self._loop.call_later(delay, self._callback)
            return
        when_ns = max(when_ns, 1)  # an all-zero it_value would disarm the timer
        spec = self._spec
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(when_ns, 1_000_000_000)
        if self._libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None):
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def _on_readable(self) -> None:
        try:
            os.read(self._fd, 8)  # syscall; clears the expiry count
        except BlockingIOError:  # re-armed after it fired: not due yet
            return
        self._callback()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
