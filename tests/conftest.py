"""Shared fixtures: tiny Gemma 3n models built once (and cached on disk by content hash)."""
from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    # transformers >= 5.2x swaps layers for hub kernels on load by default: the references must be
    # the plain model, and the kernels a network fetch (the GPU image has no `kernels` package and
    # refused every CUDA load). Children the tests start inherit it.
    os.environ["USE_HUB_KERNELS"] = "NO"
    # One torch thread: the tiny models' many small ops run faster without the pool's spinning,
    # and far faster when another process shares the 2 cores (see ../shared/gemma3n-notes.md).
    torch.set_num_threads(int(os.environ.get("GEMMA3N_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_random():
    """Folder of a seeded random tiny Gemma 3n (all three towers, dead k/v like Google's files)."""
    from quantize.tiny import cached_tiny

    return cached_tiny("random")


@pytest.fixture(scope="session")
def tiny_trained():
    """Folder of the tiny Gemma 3n whose text decoder was trained on the embedded corpus."""
    from quantize.tiny import cached_tiny

    return cached_tiny("trained")
