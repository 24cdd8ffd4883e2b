"""Shared fixtures. Reference data comes from ../shared/data through `shared_data` only.

GPTTRAIN_STRICT=1 (set by .ci/run and the device session) turns the skips for the optional packages the
`[dev]` extra installs (`tests.helpers.optional`) into failures: there they are always installed, and a broken
install must not pass as skipped tests. The reference data still skips where ../shared/data is absent."""

import logging
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


@pytest.fixture(autouse=True)
def _no_leaked_log_handlers():
    """An in-process `cli.main` puts a handler on the root logger writing to its test's sys.stdout, which
    pytest closes afterwards: every later log line would then fail and print a traceback (slow and noisy,
    enough to skew the timing of the loop's tests). Drop such handlers; restore the root's and gpttrain's
    levels. Pytest's own handlers (subclasses, added and removed around each phase) are left alone."""
    root = logging.getLogger()
    before = set(root.handlers)
    levels = root.level, logging.getLogger("gpttrain").level
    yield
    for handler in root.handlers[:]:
        if type(handler) is logging.StreamHandler and handler not in before:
            root.removeHandler(handler)
    root.setLevel(levels[0])
    logging.getLogger("gpttrain").setLevel(levels[1])


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests skip, with the reason, where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
