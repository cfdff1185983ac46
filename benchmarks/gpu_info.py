"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, which puts this folder
on ``sys.path``): the short GPU name used in result file names, and atomic JSON writes."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def gpu_name() -> str:
    """``H100`` or ``H200`` for those cards, the device name with underscores otherwise, ``cpu`` without CUDA."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    return "H200" if "H200" in name else "H100" if "H100" in name else name.replace(" ", "_")


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` to ``path`` through a temporary file, so that a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    return path
