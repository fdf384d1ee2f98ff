"""``rtbserve sagemaker package`` and ``deploy`` (rtbserve.deploy), without AWS.

Packages are checked by re-reading them: members, bytes, tar/gzip metadata, byte-identical
rebuilds, refusals, and a precompiled cache that the extracted copy (and ``serve``) loads from.
Deployments are checked request by request with botocore's Stubber (it refuses any call or
parameter it was not told to expect), and ``--dry-run`` must print exactly those requests.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import rtbserve
from rtbserve.deploy import (
    ARCHIVE_CACHE_DIR,
    add_sagemaker_parser,
    package_model,
    parse_container_spec,
    seed_cache,
)
from rtbserve.errors import ArtifactError, ConfigError

ROLE = "arn:aws:iam::123456789012:role/service-role/SageMakerExecution"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/rtbserve:1.0"
OTHER_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/featurizer:2"
MODEL_DATA = "s3://rtb-models/filter/v3/model.tar.gz"
ARN = "arn:aws:sagemaker:us-east-1:123456789012"
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
BASE = ["--name", "rtb-filter", "--role-arn", ROLE, "--image-uri", IMAGE]
DEPLOY = ["deploy", *BASE, "--model-data", MODEL_DATA]  # a valid single-model deployment


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small XGBoost bid filter with its side files (features.json, rtbserve.toml, sample)."""
    import xgboost as xgb

    d = tmp_path_factory.mktemp("trained")
    rng = np.random.default_rng(7)
    X = rng.normal(size=(400, 6)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.float32)
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 3, "seed": 0}, xgb.DMatrix(X, label=y), 8
    )
    booster.save_model(d / "model.json")
    (d / "features.json").write_text(json.dumps({"threshold": 0.4}))
    (d / "rtbserve.toml").write_text('backend = "auto"\nthreshold = 0.4\n')
    np.savetxt(d / "sample.csv", X[:20], delimiter=",", fmt="%.6g")
    return d


@pytest.fixture
def model_dir(trained: Path, tmp_path: Path) -> Path:
    """A fresh copy of ``trained`` with a code/ directory and files that must be left out."""
    d = tmp_path / "rtb-filter"
    shutil.copytree(trained, d)
    (d / "code").mkdir()
    # helpers only: a model_fn would load the model instead of rtbserve (rtbserve.handlers)
    (d / "code" / "inference.py").write_text("import json\n")
    (d / "code" / "requirements.txt").write_text("orjson\n")
    (d / "code" / "__pycache__").mkdir()
    (d / "code" / "__pycache__" / "inference.cpython-311.pyc").write_bytes(b"\0" * 16)
    (d / "README.md").write_text("notes\n")
    (d / "train.log").write_text("trained\n")
    return d


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str], client: Any = None) -> Any:
    """``rtbserve sagemaker ...`` through the parser the CLI wires; (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="rtbserve")
    add_sagemaker_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sagemaker", *argv])
    code = args.func(args, client=client) if client is not None else args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def extract(archive: Path, to: Path) -> Path:
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(to, filter="data")
    return to


# -- package --------------------------------------------------------------------------------


def test_package_round_trip(model_dir: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "model.tar.gz"
    code, stdout, stderr = run_cli(
        ["package", str(model_dir), str(out), "--cache-dir", str(tmp_path / "cache")], capsys
    )
    assert code == 0, stderr
    with tarfile.open(out, "r:gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == [
        "code",
        "code/inference.py",
        "code/requirements.txt",
        "features.json",
        "model.json",
        "rtbserve.toml",
        "sample.csv",
    ]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "root", "root")
        assert m.mode == (0o755 if m.isdir() else 0o644), m.name
    files = extract(out, tmp_path / "x")
    for name in names:
        if name != "code":
            assert (files / name).read_bytes() == (model_dir / name).read_bytes(), name
    raw = out.read_bytes()
    assert raw[:3] == b"\x1f\x8b\x08" and raw[3] & 0x08 == 0, "gzip header names no file"
    assert raw[4:8] == b"\0\0\0\0", "gzip header mtime is 0"
    assert f"sha256  {hashlib.sha256(raw).hexdigest()}" in stdout
    assert f"size    {len(raw):,} bytes" in stdout
    assert "verified" in stdout and "loads (" in stdout
    assert "left out README.md, train.log" in stderr
    # what serve does with the extracted directory: finds the model beside code/
    model = rtbserve.load_model(files, cache_dir=tmp_path / "cache")
    assert model.n_features == 6 and model.threshold == 0.4


def test_package_bytes_are_reproducible(model_dir: Path, tmp_path: Path) -> None:
    first = package_model(model_dir, tmp_path / "a.tar.gz", verify=False)
    for p in model_dir.rglob("*"):  # new mtimes, same contents
        os.utime(p, (1_700_000_000, 1_700_000_000))
    second = package_model(model_dir, tmp_path / "b.tar.gz", verify=False)
    assert first.sha256 == second.sha256
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()
    assert first.sha256 == hashlib.sha256((tmp_path / "a.tar.gz").read_bytes()).hexdigest()
    assert first.size_bytes == (tmp_path / "a.tar.gz").stat().st_size


def test_package_a_model_file_keeps_its_name(trained: Path, tmp_path: Path) -> None:
    d = tmp_path / "src"
    shutil.copytree(trained, d)
    (d / "model.json").rename(d / "bid-filter-v3.json")
    result = package_model(d / "bid-filter-v3.json", tmp_path / "m.tar.gz", cache_dir=tmp_path)
    assert result.model_file == "bid-filter-v3.json"
    assert [n for n, _ in result.members] == [
        "bid-filter-v3.json",
        "features.json",
        "rtbserve.toml",
        "sample.csv",
    ]
    assert result.verified is not None and "loads" in result.verified


def test_package_refuses_several_models(trained: Path, tmp_path: Path, capsys: Any) -> None:
    d = tmp_path / "two"
    shutil.copytree(trained, d)
    shutil.copy(d / "model.json", d / "xgboost-model")  # serve would silently take this one
    with pytest.raises(ConfigError, match=r"several models .*model\.json, xgboost-model"):
        package_model(d, tmp_path / "m.tar.gz")
    code, _, stderr = run_cli(["package", str(d), str(tmp_path / "m.tar.gz")], capsys)
    assert code == 2 and "several models" in stderr
    assert not (tmp_path / "m.tar.gz").exists()

    repo = tmp_path / "repo"
    for name in ("a", "b"):
        shutil.copytree(trained, repo / name)
    with pytest.raises(ConfigError, match=r"repository of 2 models \(a, b\)"):
        package_model(repo, tmp_path / "m.tar.gz")


def test_package_code_option_and_conflict(trained: Path, model_dir: Path, tmp_path: Path) -> None:
    code = tmp_path / "handler"
    code.mkdir()
    (code / "inference.py").write_text("def input_fn(body, content_type):\n    return body\n")
    (code / "lib").mkdir()
    (code / "lib" / "util.py").write_text("X = 1\n")
    d = tmp_path / "plain"
    shutil.copytree(trained, d)
    result = package_model(d, tmp_path / "m.tar.gz", code_dir=code, verify=False)
    names = [n for n, _ in result.members]
    assert "code/inference.py" in names and "code/lib/util.py" in names
    with pytest.raises(ConfigError, match="already has a code/ directory"):
        package_model(model_dir, tmp_path / "n.tar.gz", code_dir=code)


def test_package_symlinks(model_dir: Path, tmp_path: Path) -> None:
    (model_dir / "code" / "shared.py").symlink_to(model_dir / "code" / "inference.py")
    result = package_model(model_dir, tmp_path / "m.tar.gz", verify=False)
    with tarfile.open(tmp_path / "m.tar.gz") as tar:
        member = tar.getmember("code/shared.py")
    assert member.isreg() and dict(result.members)["code/shared.py"] == member.size

    outside = tmp_path / "secret.txt"
    outside.write_text("not for the archive\n")
    (model_dir / "code" / "leak.txt").symlink_to(outside)
    with pytest.raises(ConfigError, match="outside"):
        package_model(model_dir, tmp_path / "n.tar.gz", verify=False)
    (model_dir / "code" / "leak.txt").unlink()
    (model_dir / "code" / "pkg").symlink_to(model_dir / "code", target_is_directory=True)
    with pytest.raises(ConfigError, match="link to a directory"):
        package_model(model_dir, tmp_path / "n.tar.gz", verify=False)


def test_package_refusals(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"must end in \.tar\.gz"):
        package_model(trained, tmp_path / "model.tgz")
    with pytest.raises(ConfigError, match="does not exist"):
        package_model(tmp_path / "missing", tmp_path / "m.tar.gz")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text('{"learner": {}}')  # sniffs as XGBoost JSON, loads not
    with pytest.raises(ArtifactError):
        package_model(broken, tmp_path / "m.tar.gz", cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "cache"], "nothing left"
    # without verification the same archive is written: the check is what refuses it
    package_model(broken, tmp_path / "m.tar.gz", verify=False)
    assert (tmp_path / "m.tar.gz").is_file()


def test_precompiled_cache_is_what_serve_loads(
    model_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "model.tar.gz"
    cache = tmp_path / "build-cache"
    code, stdout, stderr = run_cli(
        ["package", str(model_dir), str(out), "--precompile", "--cache-dir", str(cache)], capsys
    )
    assert code == 0, stderr
    assert "numba from the packaged cache" in stdout
    with tarfile.open(out, "r:gz") as tar:
        cached = [m.name for m in tar.getmembers() if m.isreg() and m.name.startswith(".")]
    names = {Path(n).name for n in cached}
    assert {"numba.json", "forest.npz", "model.json", "probe.npz", "autotune-fast.json"} <= names
    assert not any(Path(n).name.startswith(".") for n in cached), "no .lock or temporaries"

    base = tmp_path / "ml"
    files = extract(out, base / "model")
    packaged = files / ARCHIVE_CACHE_DIR
    model = rtbserve.load_model(files, cache_dir=packaged)
    assert model.reports["numba"]["from_cache"] is True

    # serve's way: the packaged entries seeded into the (writable) cache it uses
    fresh = tmp_path / "serve-cache"
    assert len(seed_cache(files, fresh)) == 1
    assert seed_cache(files, fresh) == []  # present entries are left alone
    model = rtbserve.load_model(files, cache_dir=fresh)
    assert model.reports["numba"]["from_cache"] is True
    assert model.predict(np.zeros((1, 6), np.float32)).shape == (1,)

    # `serve compile` with RTBSERVE_CACHE_DIR on the packaged cache neither builds nor writes
    before = {p: p.stat().st_mtime_ns for p in packaged.rglob("*")}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from rtbserve.cli import sagemaker_serve; "
            "sys.exit(sagemaker_serve(['compile']))",
        ],
        env={**os.environ, "SAGEMAKER_BASE_DIR": str(base), "RTBSERVE_CACHE_DIR": str(packaged)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "numba" in done.stdout
    assert {p: p.stat().st_mtime_ns for p in packaged.rglob("*")} == before


# -- deploy ---------------------------------------------------------------------------------


@pytest.fixture
def sagemaker() -> Any:
    """A SageMaker client that cannot reach AWS, wrapped in a Stubber (entered)."""
    boto3 = pytest.importorskip("boto3")
    from botocore.stub import Stubber

    client = boto3.client(
        "sagemaker",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def expect_absent(stubber: Any, model: str, config: str, endpoint: str) -> None:
    stubber.add_client_error(
        "describe_endpoint",
        service_error_code="ValidationException",
        service_message=f'Could not find endpoint "{ARN}:endpoint/{endpoint}".',
        expected_params={"EndpointName": endpoint},
    )
    stubber.add_client_error(
        "describe_model",
        service_error_code="ValidationException",
        service_message=f'Could not find model "{ARN}:model/{model}".',
        expected_params={"ModelName": model},
    )
    stubber.add_client_error(
        "describe_endpoint_config",
        service_error_code="ValidationException",
        service_message=f'Could not find endpoint configuration "{ARN}:endpoint-config/{config}".',
        expected_params={"EndpointConfigName": config},
    )


def expect_creates(stubber: Any, calls: list[tuple[str, dict[str, Any]]]) -> None:
    responses = {
        "CreateModel": ("create_model", {"ModelArn": f"{ARN}:model/m"}),
        "CreateEndpointConfig": (
            "create_endpoint_config",
            {"EndpointConfigArn": f"{ARN}:endpoint-config/c"},
        ),
        "CreateEndpoint": ("create_endpoint", {"EndpointArn": f"{ARN}:endpoint/e"}),
        "UpdateEndpoint": ("update_endpoint", {"EndpointArn": f"{ARN}:endpoint/e"}),
    }
    for operation, params in calls:
        method, response = responses[operation]
        stubber.add_response(method, response, params)


def endpoint_description(name: str, status: str, config: str, **extra: Any) -> dict[str, Any]:
    return {
        "EndpointName": name,
        "EndpointArn": f"{ARN}:endpoint/{name}",
        "EndpointConfigName": config,
        "EndpointStatus": status,
        "CreationTime": NOW,
        "LastModifiedTime": NOW,
        **extra,
    }


def variant(model: str, instance_type: str = "ml.c7i.large", count: int = 1) -> dict[str, Any]:
    return {
        "VariantName": "AllTraffic",
        "ModelName": model,
        "InstanceType": instance_type,
        "InitialInstanceCount": count,
        "InitialVariantWeight": 1.0,
    }


def write_containers_json(path: Path) -> Path:
    path.write_text(
        json.dumps(
            [
                {
                    "Image": OTHER_IMAGE,
                    "ContainerHostname": "featurizer",
                    "ModelDataUrl": "s3://rtb-models/featurizer/model.tar.gz",
                },
                {
                    "ContainerHostname": "rtb-filter",
                    "ModelDataUrl": MODEL_DATA,
                    "Environment": {"SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "application/json"},
                },
            ]
        )
    )
    return path


# Each case: flags after `deploy --role-arn ROLE`, then the exact requests they must send.
CASES: dict[str, tuple[list[str], list[tuple[str, dict[str, Any]]]]] = {
    "single": (
        (
            f"--name rtb-filter --image-uri {IMAGE} --model-data {MODEL_DATA} "
            "--env SAGEMAKER_MODEL_SERVER_WORKERS=2 "
            "--env SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT=application/json"
        ).split(),
        [
            (
                "CreateModel",
                {
                    "ModelName": "rtb-filter",
                    "ExecutionRoleArn": ROLE,
                    "PrimaryContainer": {
                        "Image": IMAGE,
                        "ModelDataUrl": MODEL_DATA,
                        "Environment": {
                            "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
                            "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "application/json",
                        },
                        "Mode": "SingleModel",
                    },
                },
            ),
            (
                "CreateEndpointConfig",
                {
                    "EndpointConfigName": "rtb-filter",
                    "ProductionVariants": [variant("rtb-filter")],
                },
            ),
            ("CreateEndpoint", {"EndpointName": "rtb-filter", "EndpointConfigName": "rtb-filter"}),
        ],
    ),
    "multi-model": (
        (
            f"--name rtb-models --image-uri {IMAGE} --multi-model --model-data "
            "s3://rtb-models/all/ --instance-type ml.m7i.xlarge --instance-count 2"
        ).split(),
        [
            (
                "CreateModel",
                {
                    "ModelName": "rtb-models",
                    "ExecutionRoleArn": ROLE,
                    "PrimaryContainer": {
                        "Image": IMAGE,
                        "ModelDataUrl": "s3://rtb-models/all/",
                        "Environment": {"SAGEMAKER_MULTI_MODEL": "true"},
                        "Mode": "MultiModel",
                    },
                },
            ),
            (
                "CreateEndpointConfig",
                {
                    "EndpointConfigName": "rtb-models",
                    "ProductionVariants": [variant("rtb-models", "ml.m7i.xlarge", 2)],
                },
            ),
            ("CreateEndpoint", {"EndpointName": "rtb-models", "EndpointConfigName": "rtb-models"}),
        ],
    ),
    "serial": (
        (
            f"--name rtb-pipeline --image-uri {IMAGE} "
            f"--container image={OTHER_IMAGE},model-data=s3://rtb-models/featurizer/model.tar.gz"
            ",env=MODE=dense;COLUMNS=a,b,c "
            f"--container model-data={MODEL_DATA},env=SAGEMAKER_MODEL_SERVER_WORKERS=1"
        ).split(),
        [
            (
                "CreateModel",
                {
                    "ModelName": "rtb-pipeline",
                    "ExecutionRoleArn": ROLE,
                    "Containers": [
                        {
                            "Image": OTHER_IMAGE,
                            "ModelDataUrl": "s3://rtb-models/featurizer/model.tar.gz",
                            "Environment": {"MODE": "dense", "COLUMNS": "a,b,c"},
                        },
                        {
                            "Image": IMAGE,
                            "ModelDataUrl": MODEL_DATA,
                            "Environment": {"SAGEMAKER_MODEL_SERVER_WORKERS": "1"},
                        },
                    ],
                    "InferenceExecutionConfig": {"Mode": "Serial"},
                },
            ),
            (
                "CreateEndpointConfig",
                {
                    "EndpointConfigName": "rtb-pipeline",
                    "ProductionVariants": [variant("rtb-pipeline")],
                },
            ),
            (
                "CreateEndpoint",
                {"EndpointName": "rtb-pipeline", "EndpointConfigName": "rtb-pipeline"},
            ),
        ],
    ),
    "direct": (
        (
            f"--name rtb-multi --image-uri {IMAGE} --inference-mode direct "
            "--containers-json CONTAINERS_JSON"
        ).split(),
        [
            (
                "CreateModel",
                {
                    "ModelName": "rtb-multi",
                    "ExecutionRoleArn": ROLE,
                    "Containers": [
                        {
                            "Image": OTHER_IMAGE,
                            "ContainerHostname": "featurizer",
                            "ModelDataUrl": "s3://rtb-models/featurizer/model.tar.gz",
                        },
                        {
                            "Image": IMAGE,
                            "ContainerHostname": "rtb-filter",
                            "ModelDataUrl": MODEL_DATA,
                            "Environment": {
                                "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "application/json"
                            },
                        },
                    ],
                    "InferenceExecutionConfig": {"Mode": "Direct"},
                },
            ),
            (
                "CreateEndpointConfig",
                {
                    "EndpointConfigName": "rtb-multi",
                    "ProductionVariants": [variant("rtb-multi")],
                },
            ),
            ("CreateEndpoint", {"EndpointName": "rtb-multi", "EndpointConfigName": "rtb-multi"}),
        ],
    ),
}


def case_argv(case: str, tmp_path: Path) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    flags, calls = CASES[case]
    json_file = str(write_containers_json(tmp_path / "containers.json"))
    argv = [
        "deploy",
        "--role-arn",
        ROLE,
        *(json_file if f == "CONTAINERS_JSON" else f for f in flags),
    ]
    return argv, calls


@pytest.mark.parametrize("case", sorted(CASES))
def test_deploy_sends_exactly_these_requests(
    case: str, sagemaker: Any, tmp_path: Path, capsys: Any
) -> None:
    client, stubber = sagemaker
    argv, calls = case_argv(case, tmp_path)
    name = calls[-1][1]["EndpointName"]
    expect_absent(stubber, name, name, name)
    expect_creates(stubber, calls)
    stubber.add_response(
        "describe_endpoint",
        endpoint_description(name, "InService", name),
        {"EndpointName": name},
    )
    code, out, err = run_cli([*argv, "--wait"], capsys, client=client)
    assert code == 0, err
    assert f"endpoint {name!r} is InService" in out


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_prints_the_same_requests(case: str, tmp_path: Path, capsys: Any) -> None:
    argv, calls = case_argv(case, tmp_path)
    code, out, err = run_cli([*argv, "--dry-run"], capsys)
    assert code == 0, err
    printed = [json.loads(line) for line in out.splitlines()]
    assert [(p["operation"], p["params"]) for p in printed] == calls


def test_replace_rolls_the_endpoint_to_a_new_revision(sagemaker: Any, capsys: Any) -> None:
    client, stubber = sagemaker
    new = "rtb-filter-r42"
    stubber.add_response(
        "describe_endpoint",
        endpoint_description("rtb-filter", "InService", "rtb-filter"),
        {"EndpointName": "rtb-filter"},
    )
    expect_absent_revision = [
        ("describe_model", "ModelName"),
        ("describe_endpoint_config", "EndpointConfigName"),
    ]
    for method, key in expect_absent_revision:
        stubber.add_client_error(
            method,
            service_error_code="ValidationException",
            service_message=f'Could not find thing "{new}".',
            expected_params={key: new},
        )
    calls = [
        (
            "CreateModel",
            {
                "ModelName": new,
                "ExecutionRoleArn": ROLE,
                "PrimaryContainer": {
                    "Image": IMAGE,
                    "ModelDataUrl": MODEL_DATA,
                    "Mode": "SingleModel",
                },
            },
        ),
        ("CreateEndpointConfig", {"EndpointConfigName": new, "ProductionVariants": [variant(new)]}),
        ("UpdateEndpoint", {"EndpointName": "rtb-filter", "EndpointConfigName": new}),
    ]
    expect_creates(stubber, calls)
    argv = [*DEPLOY, "--replace", "--revision", "r42"]
    code, out, err = run_cli(argv, capsys, client=client)
    assert code == 0, err
    assert "rolling from config 'rtb-filter' to 'rtb-filter-r42'" in out
    code, out, _ = run_cli([*argv, "--dry-run"], capsys)
    assert [(p["operation"], p["params"]) for p in map(json.loads, out.splitlines())] == calls


def test_existing_resources_are_refused_without_replace(sagemaker: Any, capsys: Any) -> None:
    client, stubber = sagemaker
    stubber.add_response(
        "describe_endpoint",
        endpoint_description("rtb-filter", "InService", "rtb-filter"),
        {"EndpointName": "rtb-filter"},
    )
    stubber.add_response(
        "describe_model",
        {"ModelName": "rtb-filter", "ModelArn": f"{ARN}:model/rtb-filter", "CreationTime": NOW},
        {"ModelName": "rtb-filter"},
    )
    stubber.add_client_error(
        "describe_endpoint_config",
        service_error_code="ValidationException",
        service_message="Could not find endpoint configuration.",
        expected_params={"EndpointConfigName": "rtb-filter"},
    )
    argv = DEPLOY
    code, out, err = run_cli(argv, capsys, client=client)  # a create call would fail the stub
    assert code == 2 and out == ""
    assert "endpoint 'rtb-filter' exists (InService" in err
    assert "model 'rtb-filter' exists" in err and "Nothing was changed" in err


def test_replace_waits_for_an_endpoint_in_transition(sagemaker: Any, capsys: Any) -> None:
    client, stubber = sagemaker
    stubber.add_response(
        "describe_endpoint",
        endpoint_description("rtb-filter", "Updating", "rtb-filter-r1"),
        {"EndpointName": "rtb-filter"},
    )
    for method, key in (
        ("describe_model", "ModelName"),
        ("describe_endpoint_config", "EndpointConfigName"),
    ):
        stubber.add_client_error(
            method,
            service_error_code="ValidationException",
            service_message="Could not find it.",
            expected_params={key: "rtb-filter-r2"},
        )
    code, out, err = run_cli([*DEPLOY, "--replace", "--revision", "r2"], capsys, client=client)
    assert code == 2 and out == ""
    assert "is Updating: UpdateEndpoint needs it InService" in err


def test_aws_errors_say_what_was_already_done(sagemaker: Any, capsys: Any) -> None:
    client, stubber = sagemaker
    expect_absent(stubber, "rtb-filter", "rtb-filter", "rtb-filter")
    stubber.add_response("create_model", {"ModelArn": f"{ARN}:model/rtb-filter"})
    stubber.add_client_error(
        "create_endpoint_config",
        service_error_code="ResourceLimitExceeded",
        service_message="The account-level service limit 'ml.c7i.large for endpoint usage' is 0",
    )
    argv = DEPLOY
    code, _, err = run_cli(argv, capsys, client=client)
    assert code == 1
    assert "CreateEndpointConfig: ResourceLimitExceeded" in err
    assert "already done: CreateModel ModelName 'rtb-filter'" in err


def test_wait_reports_the_failure_reason(sagemaker: Any, capsys: Any) -> None:
    client, stubber = sagemaker
    expect_absent(stubber, "rtb-filter", "rtb-filter", "rtb-filter")
    stubber.add_response("create_model", {"ModelArn": f"{ARN}:model/rtb-filter"})
    stubber.add_response("create_endpoint_config", {"EndpointConfigArn": f"{ARN}:ec/rtb-filter"})
    stubber.add_response("create_endpoint", {"EndpointArn": f"{ARN}:endpoint/rtb-filter"})
    reason = "The primary container for production variant AllTraffic did not pass the ping"
    stubber.add_response(
        "describe_endpoint",
        endpoint_description("rtb-filter", "Failed", "rtb-filter", FailureReason=reason),
        {"EndpointName": "rtb-filter"},
    )
    argv = [*DEPLOY, "--wait"]
    code, _, err = run_cli(argv, capsys, client=client)
    assert code == 1 and reason in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--name", "rtb_filter", "--role-arn", ROLE, "--image-uri", IMAGE], "--name 'rtb_filter'"),
        (["--name=x-", "--role-arn", ROLE, "--image-uri", IMAGE], "starting and ending"),
        (["--name", "a" * 64, "--role-arn", ROLE, "--image-uri", IMAGE], "1-63"),
        (
            ["--name", "x", "--role-arn", "arn:aws:iam::1234:role/r", "--image-uri", IMAGE],
            "--role-arn",
        ),
        (["--name", "x", "--role-arn", ROLE], "--image-uri is required"),
        ([*BASE, "--model-data", "s3://rtb-models/model.tar"], "s3://bucket/key.tar.gz"),
        ([*BASE, "--model-data", "https://example.com/model.tar.gz"], "s3://bucket/key.tar.gz"),
        ([*BASE, "--multi-model", "--model-data", "s3://rtb-models/all"], "S3 prefix"),
        ([*BASE, "--multi-model"], "--multi-model needs --model-data"),
        ([*BASE, "--env", "NOEQUALS"], "expected KEY=VALUE"),
        ([*BASE, "--env", "1BAD=x"], "variable name '1BAD'"),
        ([*BASE, "--env", "SAGEMAKER_MODEL_SERVER_WORKERS=many"], "SAGEMAKER_MODEL_SERVER_WORKERS"),
        ([*BASE, "--env", "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT=text/html"], "text/html"),
        ([*BASE, "--instance-type", "c7i.large"], "ml.<family>.<size>"),
        ([*BASE, "--instance-count", "0"], "at least 1"),
        ([*BASE, "--revision", "r1"], "--revision only applies with --replace"),
        ([*BASE, "--replace", "--revision", "x" * 60], "a shorter --name or --revision"),
        ([*BASE, "--container", f"model-data={MODEL_DATA}"], "2 to 15 containers, got 1"),
        (
            [
                *BASE,
                "--container",
                "image=a/b",
                "--container",
                "image=c/d",
                "--model-data",
                MODEL_DATA,
            ],
            "--model-data does not apply",
        ),
        (
            [
                *BASE,
                "--inference-mode",
                "direct",
                "--container",
                "image=a/b",
                "--container",
                "image=c/d",
            ],
            "hostname= on every container",
        ),
        (
            [*BASE, "--container", "image=a/b,hostname=a", "--container", "image=c/d"],
            "every container of the pipeline or to none",
        ),
        (
            [*BASE, "--container", "image=a/b,hostname=x", "--container", "image=c/d,hostname=x"],
            "unique",
        ),
        (
            [*BASE, "--container", "image=a/b,port=1", "--container", "image=c/d"],
            "image 'a/b,port=1': expected registry/repository",
        ),
        (
            [*BASE, "--container", "port=1,image=a/b", "--container", "image=c/d"],
            "unknown field 'port=1'",
        ),
        (
            [*BASE, "--container", "image=a/b", "--container", "env=SAGEMAKER_BATCH=perhaps"],
            "SAGEMAKER_BATCH",
        ),
        ([*BASE, "--inference-mode", "serial"], "--inference-mode applies to --container"),
        (
            [*BASE, "--region", "eu-west-1", "--model-data", MODEL_DATA],
            "is in us-east-1, the endpoint in eu-west-1",
        ),
    ],
)
def test_invalid_deployments_exit_2(argv: list[str], message: str, capsys: Any) -> None:
    code, out, err = run_cli(["deploy", *argv, "--dry-run"], capsys)
    assert code == 2, (out, err)
    assert out == "" and message in err, err


def test_errors_are_reported_together(capsys: Any) -> None:
    argv = ["deploy", "--name", "bad_name", "--role-arn", "role", "--dry-run"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert "--name 'bad_name'" in err and "--role-arn 'role'" in err and "--image-uri" in err


def test_region_of_the_client_is_checked(sagemaker: Any, capsys: Any) -> None:
    client, _ = sagemaker  # us-east-1; no request may be sent
    image = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/rtbserve:1.0"
    argv = ["deploy", "--name", "x", "--role-arn", ROLE, "--image-uri", image]
    code, _, err = run_cli([*argv, "--model-data", MODEL_DATA], capsys, client=client)
    assert code == 2 and "is in eu-west-1, the endpoint in us-east-1" in err


def test_container_spec_parsing() -> None:
    assert parse_container_spec("image=r/i:1,model-data=s3://b/k.tar.gz,env=A=1;B=x,y") == {
        "Image": "r/i:1",
        "ModelDataUrl": "s3://b/k.tar.gz",
        "Environment": ["A=1", "B=x,y"],
    }
    with pytest.raises(ConfigError, match="given twice"):
        parse_container_spec("image=a/b,image=c/d")


def test_warnings_do_not_block(capsys: Any) -> None:
    argv = ["deploy", *BASE, "--instance-type", "ml.c7g.large", "--dry-run"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0
    assert "Graviton" in err and "no --model-data" in err
    (first, *_) = map(json.loads, out.splitlines())
    assert "ModelDataUrl" not in first["params"]["PrimaryContainer"]


def test_dry_run_needs_no_boto3(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ImportError
    argv = DEPLOY
    code, out, _ = run_cli([*argv, "--dry-run"], capsys)
    assert code == 0 and len(out.splitlines()) == 3
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "needs boto3" in err


def test_gzip_stream_is_plain(model_dir: Path, tmp_path: Path) -> None:
    """The archive is one gzip member holding a POSIX tar that GNU tar and Python both read."""
    package_model(model_dir, tmp_path / "m.tar.gz", verify=False)
    raw = gzip.decompress((tmp_path / "m.tar.gz").read_bytes())
    assert len(raw) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert tar.getnames()[0] == "code"
