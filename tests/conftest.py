"""Shared fixtures: tiny Gemma 3n models built once (and cached on disk by content hash)."""
from __future__ import annotations

import pytest
import torch


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
