"""Start the SageMaker-like stack: nginx -> gunicorn (gevent workers) -> the Flask app in app.py.

Usage (with the stack's venv's Python; ``bench.sagemaker`` does this)::

    python serve.py --port P --model MODEL --run-dir DIR --log FILE [--workers 2] [--no-nginx]

Like the container's ``serve`` entry point, this process starts the servers as children and
waits: gunicorn (``--workers`` gevent workers, keep-alive 60 s, each worker loading the model
once) and, unless ``--no-nginx``, nginx (one worker process per core, as ``worker_processes
auto``) listening on 127.0.0.1:P and proxying ``/ping`` and ``/invocations`` to gunicorn's unix
socket, a new upstream connection per request (nginx's default). Without nginx, gunicorn
listens on 127.0.0.1:P itself. Every child writes to ``--log``: the app's INFO line per request,
and nginx's access line per request (``combined``, as the container's nginx logs to stdout).

Prints ``started gunicorn pid N`` / ``started nginx pid N``, then ``ready: N workers loaded the
model`` once every gunicorn worker has loaded it (each writes a byte to a pipe this process
reads): ``/ping`` alone cannot tell, since one worker answers it while the other still loads.
The caller then polls ``GET /ping`` until nginx answers 200. SIGTERM or SIGINT stops both
children (gunicorn gracefully, nginx with SIGQUIT) and exits 0; if either child dies, the other
is stopped and this exits 1.
Only the standard library is used here (it runs in the stack's venv).
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
READY_FD_ENV = "SAGEMAKER_STACK_READY_FD"  # as app.py (not imported: it needs numpy)
STOP_TIMEOUT_S = 10.0

NGINX_CONF = """\
{user}worker_processes {workers};
daemon off;
pid {run}/nginx.pid;
error_log {log} error;

events {{
  worker_connections 4096;
}}

http {{
  default_type application/octet-stream;
  access_log {log} combined;
  client_body_temp_path {run}/client_body;
  proxy_temp_path {run}/proxy;
  fastcgi_temp_path {run}/fastcgi;
  uwsgi_temp_path {run}/uwsgi;
  scgi_temp_path {run}/scgi;

  upstream gunicorn {{
    server unix:{socket};
  }}

  server {{
    listen {host}:{port} deferred;
    client_max_body_size 6m;
    keepalive_timeout 60s;
    # nginx >= 1.19.10 closes a client connection after 1,000 requests by default; SageMaker's
    # front end keeps its connections, and so do the load generators
    keepalive_requests 100000000;

    location ~ ^/(ping|invocations)$ {{
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header Host $http_host;
      proxy_redirect off;
      proxy_read_timeout 60s;
      proxy_pass http://gunicorn;
    }}

    location / {{
      return 404;
    }}
  }}
}}
"""


def nginx_conf(
    *, host: str, port: int, socket: str, run_dir: str, log: str, workers: int, user: str | None
) -> str:
    """nginx's configuration for the stack (``user``: set only when nginx starts as root)."""
    return NGINX_CONF.format(
        user=f"user {user};\n" if user else "",
        workers=workers,
        run=run_dir,
        log=log,
        socket=socket,
        host=host,
        port=port,
    )


def gunicorn_argv(python: str, bind: str, workers: int) -> list[str]:
    return [
        python, "-m", "gunicorn",
        "--chdir", str(HERE),
        "--bind", bind,
        "--workers", str(workers),
        "--worker-class", "gevent",
        "--keep-alive", "60",
        "--log-level", "info",
        "--no-control-socket",  # gunicorn >= 24's admin socket in $HOME; the container has none
        "app:create_app()",
    ]  # fmt: skip


def _die_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux), so a killed bench leaves no stack."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--run-dir", required=True, help="sockets, pid file, nginx temp files")
    ap.add_argument("--log", required=True, help="every child's log lines go here")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn gevent workers")
    ap.add_argument("--nginx-workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-nginx", action="store_true", help="gunicorn on the TCP port itself")
    args = ap.parse_args(argv)

    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.log).resolve()
    log_file = log_path.open("ab", buffering=0)
    env = dict(os.environ, SAGEMAKER_STACK_MODEL=str(Path(args.model).resolve()))
    env.setdefault("OMP_NUM_THREADS", "1")

    nginx = None
    if args.no_nginx:
        bind = f"{args.host}:{args.port}"
    else:
        exe = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)),
            None,
        )
        if exe is None:
            print("nginx not found (apt-get install nginx), or pass --no-nginx", file=sys.stderr)
            return 2
        socket = run_dir / "gunicorn.sock"
        bind = f"unix:{socket}"
        conf = run_dir / "nginx.conf"
        user = pwd.getpwuid(os.geteuid()).pw_name if os.geteuid() == 0 else None
        conf.write_text(
            nginx_conf(
                host=args.host, port=args.port, socket=str(socket), run_dir=str(run_dir),
                log=str(log_path), workers=args.nginx_workers, user=user,
            )
        )  # fmt: skip
        nginx = [exe, "-p", str(run_dir), "-e", str(log_path), "-c", str(conf)]

    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop_children() -> None:
        for p, sig in zip(children, (signal.SIGTERM, signal.SIGQUIT), strict=False):
            if p.poll() is None:
                p.send_signal(sig)
        for p in children:
            try:
                p.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        stop_children()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _die_with_parent()
    # each gunicorn worker writes one byte here once its model is loaded (app.READY_FD_ENV)
    ready_r, ready_w = os.pipe()
    env[READY_FD_ENV] = str(ready_w)
    try:
        gun = subprocess.Popen(
            gunicorn_argv(sys.executable, bind, args.workers),
            env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            pass_fds=(ready_w,),
        )  # fmt: skip
        os.close(ready_w)
        children.append(gun)
        print(f"started gunicorn pid {gun.pid} on {bind}", flush=True)
        if nginx is not None:
            ng = subprocess.Popen(
                nginx, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
            )
            children.append(ng)
            print(f"started nginx pid {ng.pid} on {args.host}:{args.port}", flush=True)
        loaded = 0
        while loaded < args.workers and not stopping:
            chunk = os.read(ready_r, 64)  # EOF: gunicorn and all its workers are gone
            if not chunk:
                break
            loaded += len(chunk)
        # ready_r stays open: a worker gunicorn restarts later writes its byte into the pipe
        if stopping:
            return 0
        if loaded >= args.workers:
            print(f"ready: {loaded} workers loaded the model", flush=True)
            # wait for the first child to exit (or for a signal to stop both)
            pid, _ = os.wait()
        else:
            pid = gun.pid
        if stopping:
            return 0
        name = "nginx" if nginx is not None and pid == children[-1].pid else "gunicorn"
        print(f"{name} exited unexpectedly; see {log_path}", file=sys.stderr, flush=True)
        stop_children()
        return 1
    except ChildProcessError:  # both reaped by stop_children during a signal
        return 0
    finally:
        if not stopping:
            stop_children()
        log_file.close()


if __name__ == "__main__":
    sys.exit(main())
