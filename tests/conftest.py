"""Fixtures: a zoo of small deterministic models trained once per session, cache dirs, loaders.

Every test passes ``cache_dir=`` explicitly, so the suite never touches ~/.cache. The
differential suites share one session cache dir (each (model, backend) is compiled once per
session); cache tests use a fresh one per test (``cache_dir``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rtb_testutil import BACKENDS, ModelSpec, backend_arg, build_zoo

import rtbserve


@pytest.fixture(scope="session", autouse=True)
def _default_cache_unused(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Point the default cache at an empty dir (inherited by subprocesses); it must stay empty.

    Tests pass ``cache_dir=`` explicitly; this guard keeps ~/.cache untouched even if one forgets,
    and reports it.
    """
    default = tmp_path_factory.mktemp("default-cache-must-stay-empty")
    old = os.environ.get("RTBSERVE_CACHE_DIR")
    os.environ["RTBSERVE_CACHE_DIR"] = str(default)
    yield
    if old is None:
        os.environ.pop("RTBSERVE_CACHE_DIR", None)
    else:
        os.environ["RTBSERVE_CACHE_DIR"] = old
    leaked = sorted(p.name for p in default.iterdir())
    assert not leaked, f"a test used the default cache dir (no cache_dir=): {leaked}"


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelSpec]:
    """Every test model by name (see rtb_testutil.ALL_MODELS)."""
    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compile cache shared by the differential suites."""
    return tmp_path_factory.mktemp("session-cache")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A fresh, empty compile cache for one test."""
    d = tmp_path / "cache"
    d.mkdir()
    return d


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Every way to serve a model: numba, tl2cgen, auto, and the reference library."""
    return request.param


@pytest.fixture(scope="session")
def load(zoo: dict[str, ModelSpec], session_cache: Path) -> Any:
    """load(name, backend, **kw) -> rtbserve.Model, memoised per session (shared cache dir)."""
    memo: dict[tuple[Any, ...], rtbserve.Model] = {}

    def _load(name: str, backend: str, **kw: Any) -> rtbserve.Model:
        key = (name, backend, tuple(sorted(kw.items())))
        if key not in memo:
            spec = zoo[name]
            memo[key] = rtbserve.load_model(
                spec.path, backend=backend_arg(spec, backend), cache_dir=session_cache, **kw
            )
        return memo[key]

    return _load


# --------------------------------------------------------------------------- individual models
# Named fixtures for the models the brief lists; all come from the one session zoo.


@pytest.fixture(scope="session")
def xgb_binary_logistic(zoo: dict[str, ModelSpec]) -> ModelSpec:
    return zoo["xgb_binary_logistic_json"]


@pytest.fixture(scope="session")
def xgb_multi_softprob(zoo: dict[str, ModelSpec]) -> ModelSpec:
    return zoo["xgb_multi_softprob_json"]


@pytest.fixture(scope="session")
def xgb_regression(zoo: dict[str, ModelSpec]) -> ModelSpec:
    return zoo["xgb_reg_squarederror_json"]


@pytest.fixture(scope="session")
def xgb_categorical(zoo: dict[str, ModelSpec]) -> ModelSpec:
    return zoo["xgb_categorical"]


@pytest.fixture(scope="session")
def xgb_deep(zoo: dict[str, ModelSpec]) -> ModelSpec:
    return zoo["xgb_deep"]


@pytest.fixture(scope="session")
def lgb_binary(zoo: dict[str, ModelSpec]) -> ModelSpec:
    return zoo["lgb_binary"]


@pytest.fixture(scope="session")
def tl_checkpoint(zoo: dict[str, ModelSpec]) -> ModelSpec:
    return zoo["tl_checkpoint_binary"]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
