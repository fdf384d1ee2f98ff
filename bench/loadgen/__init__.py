"""Open-loop load generator for rtbserve's transports: HTTP, gRPC unary and gRPC streams.

Usage (``python -m bench.loadgen --help`` for every option)::

    python -m bench.loadgen http --port P --rate 5000 --duration 3        # open loop, Poisson
    python -m bench.loadgen http --port P --max --connections 64 --procs 2  # closed loop
    python -m bench.loadgen grpc --port G --slo-p99-ms 2                  # highest rate in SLO
    python -m bench.loadgen grpc-stream --port G --rate 20000 --stream-depth 16

Open loop: every request has an intended send time fixed before the run, and its latency runs
from that time, so a server stall (or a client that fell behind) shows in the percentiles instead
of silently slowing the sender (coordinated omission). Requests go out over a pool of keep-alive
connections (or concurrent calls, or streams); a due request that finds none free waits, and the
wait counts. Several processes (``--procs``), each on its own uvloop loop, share the rate; their
HDR histograms merge at the end.

Programmatic use: ``run_load(target, LoadSpec(...))`` and ``find_max_rate(...)`` return dicts
(``format_result`` prints one); ``tree_cpu_s(pid)`` gives a server's CPU for us/request.
Targets are loopback addresses only; every run is bounded in time and stops by itself.
"""

from bench.loadgen.cpu import CpuMeter, tree_cpu_s
from bench.loadgen.runner import LoadError, LoadSpec, find_max_rate, run_load
from bench.loadgen.stats import ERROR_KINDS, format_result
from bench.loadgen.targets import Target, demo_csv_row, demo_grpc_target, demo_http_target

__all__ = [
    "ERROR_KINDS",
    "CpuMeter",
    "LoadError",
    "LoadSpec",
    "Target",
    "demo_csv_row",
    "demo_grpc_target",
    "demo_http_target",
    "find_max_rate",
    "format_result",
    "run_load",
    "tree_cpu_s",
]
