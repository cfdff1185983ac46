"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, which puts this folder
on ``sys.path``): the short GPU name used in result file names and the state of Triton's cache when the script
started (first-call and first-step times include compilation and autotuning only when it was empty). Reports
are written with :func:`datamodules.atomic.write_json_atomically`."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def gpu_name() -> str:
    """``H100`` or ``H200`` for those cards, the device name with underscores otherwise, ``cpu`` without CUDA."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    return "H200" if "H200" in name else "H100" if "H100" in name else name.replace(" ", "_")


def triton_cache_state() -> dict:
    """Triton's cache folder (compiled kernels, and autotuning results under TRITON_CACHE_AUTOTUNING=1) and how
    many files it holds."""
    folder = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    files = sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
    return {"dir": str(folder), "files": files, "autotuning_cached": os.environ.get("TRITON_CACHE_AUTOTUNING") == "1"}
