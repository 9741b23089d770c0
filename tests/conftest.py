"""Shared fixtures: one synthetic CellMap dataset and one crop cache per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import config_shenron as C  # noqa: E402

# Small patches keep the suite fast on 2 CPU cores.
TEST_PATCH_YX = 64
TEST_MARGIN = (8, 32, 32)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from make_synthetic_data import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, seed=0)
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def entries(synthetic_root):
    from data import read_datasplit

    return read_datasplit(synthetic_root / "datasplit.csv")


@pytest.fixture(scope="session")
def cache(entries, cache_dir):
    from data import prepare_cache

    return prepare_cache(entries, C.ALL_CLASSES, C.TRAIN_SCALE_NM, TEST_MARGIN, cache_root=cache_dir, progress=False)


@pytest.fixture
def cli_env(cache_dir, tmp_path):
    """Environment for running the toolkit's scripts as subprocesses in tests."""
    env = dict(os.environ)
    env.update(CELLMAP_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("CELLMAP_DATA_ROOT", None)
    return env
