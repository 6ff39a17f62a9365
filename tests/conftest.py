"""Shared test helpers. Add fixtures below; keep the device markers as they are (other tests import them).

``requires_cuda`` skips a test (shown as skipped, with the reason) where no CUDA device is visible, like
Lightning's ``RunIf``; ``DEVICES`` / the ``device`` fixture run a test on the CPU always and on CUDA when there
is one.
"""

from __future__ import annotations

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device a test should run on: ``cpu``, and ``cuda`` (skipped without a GPU)."""
    return torch.device(request.param)
