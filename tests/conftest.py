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


@pytest.fixture(scope="session")
def pathfinder_baseline_dir(tmp_path_factory):
    """40 generated Pathfinder-32 images at the release's easiest difficulty (``curv_baseline``), seed 2."""
    from datamodules.lra.generate_pathfinder import write_pathfinder

    root = tmp_path_factory.mktemp("pathfinder")
    return write_pathfinder(root, resolution=32, images=40, images_per_batch=20, seed=2, contour_length=6)


@pytest.fixture
def no_tf32():
    """float32 matmuls in full float32 for one test: the 1e-4 tolerances against float64 exclude TF32's 10-bit
    mantissa."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
