"""Test setup: Triton runs under its interpreter on the CPU when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running; still part of make test")


def pytest_sessionstart(session):
    """FASTLSTM_EXPECT_BACKENDS=cuda,triton (set by benchmarks/gpu_check.sh) turns a backend that
    cannot run into a failed session, where the tests of that backend would otherwise skip or
    not be generated at all (a failed build must never pass as skipped tests)."""
    expected = [name for name in os.environ.get("FASTLSTM_EXPECT_BACKENDS", "").split(",") if name]
    if not expected:
        return
    from fastlstm import _backends
    device = "cuda" if "cuda" in expected else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.exit("FASTLSTM_EXPECT_BACKENDS names cuda but torch sees no CUDA GPU", returncode=3)
    for name in expected:
        reason = _backends.why_unavailable(name, device)
        if reason is not None:
            pytest.exit(f"FASTLSTM_EXPECT_BACKENDS: backend {name!r} cannot run on {device}: "
                        f"{reason}", returncode=3)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine; run benchmarks/gpu_check.sh on one")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
