"""A fit killed with SIGKILL mid-epoch and resumed from its last checkpoint trains exactly as an uninterrupted one.

For each task family's tiny config, three ``hgrn2 fit`` processes: one uninterrupted, one that a callback kills
(``tests/lightning_modules/resume_probe.py``) a few steps after a mid-epoch checkpoint, and one resumed from that
checkpoint. The resumed losses must equal the uninterrupted run's from the checkpoint on, bit for bit, and so must
the final weights. Each config sets ``max_epochs`` (with ``max_steps`` ending the fit), the setting under which
Lightning used to restart the epoch's data from its first batch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def overlay(tmp: Path, name: str, kill_after: int | None, save_every: int) -> Path:
    """A config layered over the task's: a checkpoint every ``save_every`` steps and the probe; no logger, no
    validation (it changes no weight), no progress bar."""
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(tmp / name / "checkpoints"),
                "every_n_train_steps": save_every,
                "save_last": True,
                "save_top_k": 0,
                "enable_version_counter": False,
            },
        },  # fmt: skip
        {
            "class_path": "tests.lightning_modules.resume_probe.ResumeProbe",
            "init_args": {
                "losses": str(tmp / f"{name}.jsonl"),
                "weights": str(tmp / f"{name}.pt"),
                "kill_after": kill_after,
            },
        },  # fmt: skip
    ]
    trainer = {
        "callbacks": callbacks, "logger": False, "enable_checkpointing": True, "enable_progress_bar": False,
        "enable_model_summary": False, "limit_val_batches": 0, "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp / name),
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"trainer": trainer}))
    return path


def fit(tmp: Path, name: str, args: list[str], save_every: int, kill_after: int | None = None, resume: str = ""):
    command = [sys.executable, "-m", "hgrn2", "fit", *args, "--config", str(overlay(tmp, name, kill_after, save_every))]
    if resume:
        command += ["--ckpt_path", str(tmp / resume / "checkpoints" / "last.ckpt")]
    # one thread: the three processes then reduce in the same order, so equal inputs give equal bits
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    expected = -signal.SIGKILL if kill_after is not None else 0
    assert result.returncode == expected, f"{name}: exit {result.returncode}\n{result.stderr[-3000:]}"
    return [json.loads(line) for line in (tmp / f"{name}.jsonl").read_text().splitlines()]


def check_exact_resume(tmp: Path, args: list[str], steps: int, save_every: int, kill_after: int) -> None:
    args = [*args, "--trainer.max_steps", str(steps)]
    straight = fit(tmp, "straight", args, save_every)
    killed = fit(tmp, "killed", args, save_every, kill_after=kill_after)
    resumed = fit(tmp, "resumed", args, save_every, resume="killed")
    assert [r["step"] for r in straight] == list(range(1, steps + 1))
    assert killed == straight[:kill_after], "the killed run is not the uninterrupted one's first steps"
    assert resumed == straight[save_every:], (
        "the resumed run's losses differ from the uninterrupted run's after the checkpoint at step "
        f"{save_every}: {[float.fromhex(r['loss']) for r in resumed][:4]} vs "
        f"{[float.fromhex(r['loss']) for r in straight[save_every:]][:4]}"
    )
    final, final_resumed = torch.load(tmp / "straight.pt"), torch.load(tmp / "resumed.pt")
    assert final.keys() == final_resumed.keys()
    different = [name for name in final if not torch.equal(final[name], final_resumed[name])]
    assert not different, f"final weights differ: {different[:5]}"


def test_lm_demo_resumes_exactly_after_a_kill(tmp_path):
    # configs/lm/demo.yaml: max_epochs 1 (thousands of batches), the demo model on the standard library
    args = ["--config", str(CONFIGS / "lm" / "demo.yaml"), "--data.init_args.batch_size", "4"]
    check_exact_resume(tmp_path, args, steps=9, save_every=5, kill_after=7)


def test_image_folder_config_resumes_exactly_after_a_kill(tmp_path):
    # configs/imagenet/folder_test.yaml: RandAugment, random erasing, Mixup/CutMix, drop-path and an EMA, 2 epochs
    # of 4 batches; the checkpoint falls in the second epoch
    from datamodules.imagenet import write_synthetic_image_folder

    root = write_synthetic_image_folder(tmp_path / "images", num_classes=4, train_per_class=8, size=32)
    args = ["--config", str(CONFIGS / "imagenet" / "folder_test.yaml"), "--data.init_args.root", str(root)]
    check_exact_resume(tmp_path, args, steps=8, save_every=5, kill_after=6)


def test_digits_demo_resumes_exactly_after_a_kill(tmp_path):
    # configs/imagenet/digits_demo.yaml: random shifts; 22 batches an epoch, so the checkpoint falls in the second
    model = "{img_size: 32, patch_size: 8, in_chans: 1, embed_dim: 16, depth: 1, drop_path_rate: 0.1, backend: naive}"
    args = ["--config", str(CONFIGS / "imagenet" / "digits_demo.yaml"), "--model.init_args.model_kwargs", model]
    check_exact_resume(tmp_path, args, steps=26, save_every=24, kill_after=25)


def test_lra_text_config_resumes_exactly_after_a_kill(tmp_path):
    # configs/lra/text_tiny.yaml with dropout on: 200 toy reviews in batches of 20, 10 batches an epoch
    subprocess.run(
        [sys.executable, "-m", "datamodules.lra.synthetic", "--task", "text", "--out", str(tmp_path / "text"),
         "--size", "100"],
        cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
    )  # fmt: skip
    overrides = "{hidden_size: 16, num_layers: 2, expand_ratio: 8, dropout: 0.1}"
    args = ["--config", str(CONFIGS / "lra" / "text_tiny.yaml"), "--data.init_args.data_dir", str(tmp_path / "text")]
    args += ["--model.init_args.overrides", overrides]
    check_exact_resume(tmp_path, args, steps=14, save_every=12, kill_after=13)


def test_mqar_config_resumes_exactly_after_a_kill(tmp_path):
    # configs/mqar/base.yaml at toy size on the CPU, max_epochs added: 12 batches an epoch
    args = ["--config", str(CONFIGS / "mqar" / "base.yaml"), "--trainer.accelerator", "cpu"]
    args += ["--trainer.precision", "32-true", "--trainer.max_epochs", "3", "--data.init_args.seq_len", "64"]
    args += ["--data.init_args.num_pairs", "4", "--data.init_args.num_train", "192", "--data.init_args.num_val", "16"]
    args += ["--data.init_args.batch_size", "16"]
    check_exact_resume(tmp_path, args, steps=16, save_every=14, kill_after=15)
