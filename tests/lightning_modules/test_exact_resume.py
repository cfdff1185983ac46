"""A fit killed with SIGKILL mid-epoch and resumed from its last checkpoint trains exactly as an uninterrupted one.

For each task family's tiny config, three ``hgrn2 fit`` processes: one uninterrupted, one that a callback kills
(``tests/lightning_modules/resume_probe.py``) a few steps after a mid-epoch checkpoint, and one resumed from that
checkpoint. The resumed losses must equal the uninterrupted run's from the checkpoint on, bit for bit, and so must
the final weights. Each config sets ``max_epochs`` (with ``max_steps`` ending the fit), the setting under which
Lightning used to restart the epoch's data from its first batch. A last test chains two resumes as
``configs/lra/listops.yaml`` trains: ``max_epochs`` alone, validation at each epoch's end, loader workers and a
checkpoint at an epoch's last batch before a mid-epoch one.
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


def overlay(tmp: Path, name: str, kill_after: int | None, save_every: int, validate: bool = False) -> Path:
    """A config layered over the task's: a checkpoint every ``save_every`` steps and the probe; no logger, no
    progress bar. No validation (it changes no weight) unless ``validate``, which keeps the task's and adds a
    second checkpoint callback, the best validation accuracy's."""
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
    if validate:
        del trainer["limit_val_batches"], trainer["num_sanity_val_steps"]
        best = dict(dirpath=str(tmp / name / "checkpoints"), monitor="val/acc", mode="max", filename="best-{step}")
        callbacks.insert(1, {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": best})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"trainer": trainer}))
    return path


def fit(
    tmp: Path,
    name: str,
    args: list[str],
    save_every: int,
    kill_after: int | None = None,
    resume: str = "",
    validate: bool = False,
):
    """The probe's records of an ``hgrn2 fit`` process: {"step", "loss"} for each training step and, with
    ``validate``, {"validated": global step} for each validation."""
    config = overlay(tmp, name, kill_after, save_every, validate)
    command = [sys.executable, "-m", "hgrn2", "fit", *args, "--config", str(config)]
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


def lra_text_args(tmp: Path, size: int) -> list[str]:
    """``hgrn2 fit`` arguments of configs/lra/text_tiny.yaml with dropout on, over toy reviews (``size`` of each
    class) that ``datamodules.lra.synthetic`` writes under ``tmp``."""
    subprocess.run(
        [sys.executable, "-m", "datamodules.lra.synthetic", "--task", "text", "--out", str(tmp / "text"),
         "--size", str(size)],
        cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
    )  # fmt: skip
    overrides = "{hidden_size: 16, num_layers: 2, expand_ratio: 8, dropout: 0.1}"
    args = ["--config", str(CONFIGS / "lra" / "text_tiny.yaml"), "--data.init_args.data_dir", str(tmp / "text")]
    return [*args, "--model.init_args.overrides", overrides]


def test_lra_text_config_resumes_exactly_after_a_kill(tmp_path):
    # 200 toy reviews in batches of 20, 10 batches an epoch
    check_exact_resume(tmp_path, lra_text_args(tmp_path, 100), steps=14, save_every=12, kill_after=13)


def test_mqar_config_resumes_exactly_after_a_kill(tmp_path):
    # configs/mqar/base.yaml at toy size on the CPU, max_epochs added: 12 batches an epoch
    args = ["--config", str(CONFIGS / "mqar" / "base.yaml"), "--trainer.accelerator", "cpu"]
    args += ["--trainer.precision", "32-true", "--trainer.max_epochs", "3", "--data.init_args.seq_len", "64"]
    args += ["--data.init_args.num_pairs", "4", "--data.init_args.num_train", "192", "--data.init_args.num_val", "16"]
    args += ["--data.init_args.batch_size", "16"]
    check_exact_resume(tmp_path, args, steps=16, save_every=14, kill_after=15)


def after_checkpoint(records: list[dict], step: int) -> list[dict]:
    """An uninterrupted run's records after the checkpoint written at ``step``: past that step and past the
    validation right after it, if any (a checkpoint at an epoch's last batch is written before the epoch's
    validation, which the interrupted run went on to run, and resumes with the next epoch)."""
    index = records.index(next(r for r in records if r.get("step") == step)) + 1
    return records[index + 1 :] if index < len(records) and "validated" in records[index] else records[index:]


def outline(records: list[dict]) -> str:
    """Where ``records`` validated and how many steps they trained, and their first loss."""
    steps = [r for r in records if "step" in r]
    validated = [r["validated"] for r in records if "validated" in r]
    return f"steps {steps[0]['step']}-{steps[-1]['step']} (first loss {steps[0]['loss']}), validated at {validated}"


def counts(ready: int, started: int, processed: int, completed: int) -> dict:
    return {"ready": ready, "started": started, "processed": processed, "completed": completed}


def test_resumes_chained_as_listops_trains_are_exact(tmp_path):
    # configs/lra/text_tiny.yaml set up as configs/lra/listops.yaml: max_epochs and no max_steps, validation at each
    # epoch's end, two persistent loader workers, last.ckpt every 5 steps and best-{step} on val/acc. 40 toy reviews
    # in batches of 4: 10 batches an epoch. The first process is killed at step 11, after validating epoch 0, so its
    # last.ckpt is step 10's, epoch 0's last batch; the second, resumed from it, is killed at step 16, its last.ckpt
    # mid-epoch (step 15); the third resumes from that and ends with epoch 2. Lightning resumes a checkpoint at an
    # epoch's last batch with the next epoch without counting that epoch as started (lightning_modules.resume counts
    # it); uncounted, the second process's checkpoint at step 15 reads as one at an epoch's end, and without
    # max_steps the third process starts epoch 1 again from its first batch and validates 5 steps late.
    args = [*lra_text_args(tmp_path, 20), "--data.init_args.batch_size", "4"]
    args += ["--data.init_args.num_workers", "2", "--trainer.max_epochs", "3"]
    straight = fit(tmp_path, "straight", args, 5, validate=True)
    first = fit(tmp_path, "first", args, 5, kill_after=11, validate=True)
    second = fit(tmp_path, "second", args, 5, kill_after=16, resume="first", validate=True)
    third = fit(tmp_path, "third", args, 5, resume="second", validate=True)
    assert [r["validated"] for r in straight if "validated" in r] == [10, 20, 30]
    assert [r["step"] for r in straight if "step" in r] == list(range(1, 31))
    assert first == straight[: len(first)] and first[-1]["step"] == 11
    expected = after_checkpoint(straight, 10)
    assert second == expected[: len(second)] and second[-1]["step"] == 16, (
        f"resumed at epoch 0's last batch: {outline(second)}, uninterrupted: {outline(expected[: len(second)])}"
    )
    # the second process counted epoch 1 as started, as an uninterrupted fit does
    saved = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["loops"]["fit_loop"]["epoch_progress"]["current"] == counts(2, 2, 1, 1)
    expected = after_checkpoint(straight, 15)
    assert third == expected, f"resumed mid-epoch after a resume: {outline(third)}, uninterrupted: {outline(expected)}"
    final, final_resumed = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "third.pt")
    different = [name for name in final if not torch.equal(final[name], final_resumed[name])]
    assert final.keys() == final_resumed.keys() and not different, f"final weights differ: {different[:5]}"


def test_counters_that_earlier_resumes_left_in_a_checkpoint_are_put_right():
    from lightning_modules.resume import repair_loop_progress

    def state(epoch: dict, batch_total: dict, batch_current: dict) -> dict:
        return {
            "epoch_progress": {"total": dict(epoch), "current": dict(epoch)},
            "epoch_loop.batch_progress": {"total": batch_total, "current": batch_current, "is_last_batch": False},
        }

    # written at step 25, batch 5 of epoch 2, by a fit resumed at an epoch's end: epoch 2 not counted as started
    lagging = state(counts(2, 2, 2, 2), counts(25, 25, 25, 24), counts(5, 5, 5, 4))
    repair_loop_progress(lagging)
    assert lagging == state(counts(3, 3, 2, 2), counts(25, 25, 25, 24), counts(5, 5, 5, 4))
    # written by a fit that resumed such a checkpoint: batches trained whose completion went uncounted
    behind = state(counts(16, 16, 15, 15), counts(12250, 12250, 12250, 12247), counts(749, 749, 749, 748))
    repair_loop_progress(behind)
    assert behind == state(counts(16, 16, 15, 15), counts(12250, 12250, 12250, 12249), counts(749, 749, 749, 748))
    # an uninterrupted fit's, at a batch's end and at an epoch's end (best-{step}, after validation): left alone
    for right in (
        state(counts(3, 3, 2, 2), counts(25, 25, 25, 24), counts(5, 5, 5, 4)),
        state(counts(3, 3, 3, 2), counts(30, 30, 30, 30), counts(10, 10, 10, 10)),
    ):
        before = json.loads(json.dumps(right))
        repair_loop_progress(right)
        assert right == before
