"""experiments/lra_learning.py: the wall-clock schedule and training across several calls from a checkpoint."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import load_experiment


@pytest.fixture
def lra_learning(monkeypatch):
    return load_experiment("lra_learning", monkeypatch)


def test_schedule_warms_up_then_follows_a_cosine_to_zero(lra_learning):
    schedule = lra_learning.WallClockCosine(peak_lr=1.0, budget_s=100.0, warmup_fraction=0.1)
    assert schedule.factor(0.0) == 0.0
    assert schedule.factor(5.0) == pytest.approx(0.5)
    assert schedule.factor(10.0) == pytest.approx(1.0)
    assert schedule.factor(55.0) == pytest.approx(0.5)  # halfway through the cosine: (1 + cos(π/2)) / 2
    assert schedule.factor(100.0) == pytest.approx(0.0, abs=1e-12)
    assert schedule.factor(250.0) == pytest.approx(0.0, abs=1e-12)
    assert schedule.factor(32.5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_schedule_state_resumes_its_clock_and_refuses_another_budget(lra_learning):
    saved = {"elapsed_s": 42.0, "budget_s": 100.0}
    schedule = lra_learning.WallClockCosine(peak_lr=1.0, budget_s=100.0)
    schedule.load_state_dict(saved)
    assert schedule.elapsed_s() == 42.0
    with pytest.raises(ValueError, match="--total-minutes"):
        lra_learning.WallClockCosine(peak_lr=1.0, budget_s=60.0).load_state_dict(saved)


def test_two_calls_train_one_schedule_then_stop(lra_learning, tmp_path, capsys):
    argv = [
        "--tiny", "--tasks", "listops", "--minutes", "0.05", "--total-minutes", "0.1", "--workers", "1",
        "--print-every", "1",
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
        "--data-dir", str(tmp_path / "data"),
    ]  # fmt: skip
    first = lra_learning.main(argv)["tasks"]["listops"]
    assert first["resumed_from_s"] == 0.0 and first["steps"] > 0
    progress = [line for line in capsys.readouterr().out.splitlines() if "steps/s" in line]
    assert progress and progress[0].startswith("[listops] step 1 ")
    assert (tmp_path / "ckpt" / "listops.ckpt").exists()
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    second = lra_learning.main(argv)["tasks"]["listops"]
    assert second["resumed_from_s"] == pytest.approx(first["trained_s"], abs=0.2)
    assert second["steps"] > first["steps"]  # the step count carries on from the checkpoint
    assert second["trained_s"] == pytest.approx(6.0, abs=1.5)  # the 0.1 minutes, over both calls
    assert first["curve"], "no validation epoch in the first call"
    assert second["curve"][: len(first["curve"])] == first["curve"]  # the curve carries on from the checkpoint
    assert len(second["curve"]) > len(first["curve"])
    steps = [point["step"] for point in second["curve"]]
    assert steps == sorted(steps) and steps[-1] <= second["steps"]
    written = json.loads(next((tmp_path / "out").glob("*-lra.json")).read_text())
    assert written["tasks"]["listops"]["steps"] == second["steps"]
    with pytest.raises(SystemExit, match="nothing left to train"):
        lra_learning.main(argv)

    # a tagged variant with its own batch and learning rate: its own checkpoint and entry beside the first run's
    flags = ["--tag", "b16", "--batch-size", "16", "--lr", "1e-3", "--clip", "0.5", "--precision", "32-true"]
    variant = lra_learning.main([*argv, *flags])["tasks"]["listops-b16"]
    assert variant["precision"] == "32-true"
    assert variant["batch_size"] == 16 and variant["optimizer"]["peak_lr"] == 1e-3
    assert variant["optimizer"]["gradient_clip_norm"] == 0.5
    assert variant["resumed_from_s"] == 0.0
    assert (tmp_path / "ckpt" / "listops-b16.ckpt").exists()
    written = json.loads(next((tmp_path / "out").glob("*-lra.json")).read_text())
    assert set(written["tasks"]) == {"listops", "listops-b16"}


def test_prepare_only_draws_the_data_and_trains_nothing(lra_learning, tmp_path):
    argv = ["--tiny", "--tasks", "pathfinder", "--workers", "1", "--prepare-only", "--data-dir", str(tmp_path / "d")]
    report = lra_learning.main([*argv, "--out", str(tmp_path / "out")])
    assert report["tasks"] == {} and not (tmp_path / "out").exists()
    metadata = list((tmp_path / "d").glob("pathfinder-150-s0/pathfinder32/*/metadata/*.npy"))
    assert sum(len(m.read_text().splitlines()) for m in metadata) == 150


@pytest.mark.parametrize("flag", [["--tag", "a/b"], ["--batch-size", "0"], ["--lr", "-1"], ["--clip", "0"]])
def test_bad_variant_flags_are_refused(lra_learning, flag):
    with pytest.raises(SystemExit):
        lra_learning.main(["--tiny", *flag])


def test_batch_size_and_learning_rate_flags_change_nothing_else(lra_learning):
    spec, overrides = lra_learning.apply_settings(lra_learning.parse_args(["--lr", "1e-3", "--batch-size", "64"]))
    assert overrides == {"listops": {"backend": "auto"}, "pathfinder": {"backend": "auto"}}  # the paper's models
    assert spec == lra_learning.ListOpsSpec()
    args = lra_learning.parse_args(["--lr", "1e-3", "--batch-size", "64"])
    lra_learning.apply_settings(args)
    assert args.peak_lrs == {"listops": 1e-3, "pathfinder": 1e-3}
    assert args.batch_sizes == {"listops": 64, "pathfinder": 64}
    args = lra_learning.parse_args(["--overrides", '{"norm": "layernorm"}'])
    _, overrides = lra_learning.apply_settings(args)
    assert overrides["pathfinder"] == {"norm": "layernorm", "backend": "auto"}
    assert args.peak_lrs == lra_learning.PEAK_LR and args.batch_sizes == lra_learning.BATCH_SIZE  # the paper's
    tiny = lra_learning.parse_args(["--tiny"])
    _, overrides = lra_learning.apply_settings(tiny)
    assert overrides["pathfinder"]["hidden_size"] == 16 and tiny.batch_sizes["pathfinder"] == 32
    assert lra_learning.BATCH_SIZE == {"listops": 128, "pathfinder": 128}  # the module's table is left alone


def test_easier_difficulty_then_a_run_started_from_its_weights(lra_learning, tmp_path, monkeypatch):
    common = [
        "--tiny", "--tasks", "pathfinder", "--minutes", "0.03", "--workers", "1", "--print-every", "0",
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "d"),
    ]  # fmt: skip
    easy = lra_learning.main([*common, "--pathfinder-contour-length", "6", "--tag", "c6"])["tasks"]["pathfinder-c6"]
    assert easy["data"]["difficulty"] == "curv_baseline" and easy["data"]["contour_length"] == 6
    lines = (tmp_path / "d" / "pathfinder-c6-150-s0/pathfinder32/curv_baseline/metadata/0.npy").read_text()
    assert lines.split()[5] == "6"  # the metadata's contour length field
    source = tmp_path / "ckpt" / "pathfinder-c6.ckpt"

    import torch

    saved = torch.load(source, map_location="cpu", weights_only=False)["state_dict"]
    seen = {}

    start_clock = lra_learning.WallClockCosine.on_train_start

    def capture(self, trainer, pl_module):  # the weights the run starts from, before its first step
        seen.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        start_clock(self, trainer, pl_module)

    monkeypatch.setattr(lra_learning.WallClockCosine, "on_train_start", capture)
    report = lra_learning.main([*common, "--tag", "from-c6", "--init-from", str(source)])
    hard = report["tasks"]["pathfinder-from-c6"]
    assert hard["data"]["difficulty"] == "curv_contour_length_14"
    assert hard["initialised_from"]["checkpoint"] == str(source)
    assert hard["initialised_from"]["steps"] == easy["steps"]
    assert seen.keys() == saved.keys()
    assert all(torch.equal(seen[k], saved[k]) for k in saved)

    bigger = [*common, "--tag", "wide", "--overrides", '{"hidden_size": 24}', "--init-from", str(source)]
    with pytest.raises(SystemExit, match="another architecture"):
        lra_learning.main(bigger)
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"broken\.ckpt: not a complete checkpoint"):
        lra_learning.main([*common, "--tag", "x", "--init-from", str(tmp_path / "broken.ckpt")])
