"""Test-wide setup: Triton runs through its interpreter unless a GPU run asks otherwise."""

import os

# Must happen before triton is first imported anywhere; a GPU run sets HGRN2_TEST_GPU=1 to keep real kernels.
if os.environ.get("HGRN2_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
