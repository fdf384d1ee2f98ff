"""The committed generated gRPC code (``rtbserve/_proto/``) matches what ``proto/`` generates.

Regenerates with the installed grpcio-tools into a temporary directory, as
``python -m rtbserve.transports.grpc.codegen --check`` does; on drift, run
``python -m rtbserve.transports.grpc.codegen`` and commit the result.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rtbserve.transports.grpc import codegen


def test_generated_code_matches_the_protos() -> None:
    summary = codegen.drift(codegen.generate_files(), codegen.committed_files())
    if summary:
        pytest.fail(
            "rtbserve/_proto/ is out of date with proto/; run "
            f"`python -m rtbserve.transports.grpc.codegen`:\n{summary}",
            pytrace=False,
        )


def test_check_mode_reports_drift(tmp_path: Path) -> None:
    files = codegen.generate_files()
    codegen.write_files(files, tmp_path)
    assert codegen.drift(files, codegen.committed_files(tmp_path)) == ""
    (tmp_path / "predictor_pb2.py").write_text(files["predictor_pb2.py"] + "# edited\n")
    (tmp_path / "stale_pb2.py").write_text("")
    (tmp_path / "grpc_service_pb2.pyi").unlink()
    summary = codegen.drift(files, codegen.committed_files(tmp_path))
    assert "changed: predictor_pb2.py (+0 -1 lines)" in summary
    assert "not generated (stale): stale_pb2.py" in summary
    assert "missing: grpc_service_pb2.pyi" in summary
    assert codegen.write_files(files, tmp_path) == [
        "grpc_service_pb2.pyi",
        "predictor_pb2.py",
        "stale_pb2.py",
    ]
    assert codegen.drift(files, codegen.committed_files(tmp_path)) == ""


def test_check_command_passes_on_the_committed_code() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rtbserve.transports.grpc.codegen", "--check"],
        capture_output=True,
        text=True,
        cwd=codegen.ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "is up to date" in done.stdout
