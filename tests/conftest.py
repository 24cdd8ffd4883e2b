"""Shared fixtures. Reference data comes from ../shared/data through `shared_data` only."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data():
    """`shared_data("name")` -> Path of ../shared/data/name, or skip where it is absent."""

    def get(name: str) -> Path:
        path = SHARED_DATA / name
        if not path.is_file():
            pytest.skip(f"reference data {path} is absent (../shared/data not beside this checkout)")
        return path

    return get


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests skip, with the reason, where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
