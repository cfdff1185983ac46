"""A whole LRA Pathfinder encoder on the Triton kernels of a CUDA GPU against the same weights on the PyTorch loop.

HGRN2_TEST_GPU=1 python -m pytest -m gpu -rP tests/models/test_lra_encoder_gpu.py
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

from hgrn2.models.lra import LRAClassifier, lra_config
from tests.ops.test_gpu_full_size import check, rel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        os.environ.get("HGRN2_TEST_GPU") != "1",
        reason="the encoder check needs the compiled kernels: set HGRN2_TEST_GPU=1 (no Triton interpreter)",
    ),
    pytest.mark.usefixtures("no_tf32"),  # compared against 1e-4
]


@pytest.mark.parametrize("overrides", [{}, {"grid_scan": "series"}], ids=["parallel", "series"])
def test_pathfinder_encoder_on_kernels_matches_the_float64_loop_in_training_mode(overrides, batch=8):
    """Logits, all the gradients as one vector, and the worst parameter among those whose gradient holds at least
    1e-3 of the whole gradient's norm: a bias added just before a BatchNorm has an exact gradient of zero, so its
    relative error would only measure rounding."""
    torch.manual_seed(4)
    kernels = LRAClassifier(lra_config("pathfinder", backend="auto", **overrides)).cuda()
    loop = LRAClassifier(lra_config("pathfinder", backend="naive", **overrides)).cuda().double()
    loop.load_state_dict(kernels.state_dict())
    length = math.prod(kernels.config.grid_size or (1024,))
    pixels = torch.randint(0, 256, (batch, length), device="cuda", dtype=torch.uint8)  # [B, T]
    cotangent = torch.randn(batch, kernels.config.num_classes, device="cuda")
    start = time.time()
    logits = kernels(pixels)
    (logits * cotangent).sum().backward()
    torch.cuda.synchronize()
    seconds = time.time() - start
    logits_ref = loop(pixels)
    (logits_ref * cotangent.double()).sum().backward()
    grads = {name: p.grad for name, p in kernels.named_parameters()}
    grads_ref = {name: p.grad for name, p in loop.named_parameters()}
    whole = torch.cat([g.flatten() for g in grads.values()]), torch.cat([g.flatten() for g in grads_ref.values()])
    floor = 1e-3 * whole[1].norm()
    large = [name for name in grads if grads_ref[name].norm() >= floor]
    worst = max(large, key=lambda name: rel(grads[name], grads_ref[name]))
    pairs = {
        "logits": (logits, logits_ref),
        "all_grads": whole,
        f"worst_param[{worst}]": (grads[worst], grads_ref[worst]),
    }
    settings = " ".join(f"{key}={value}" for key, value in overrides.items())
    skipped = len(grads) - len(large)
    check(f"LRA pathfinder {settings} encoder, B={batch} ({skipped} tiny skipped)", pairs, 1e-4, seconds)
