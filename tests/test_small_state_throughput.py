"""benchmarks/small_state_throughput.py on the CPU at tiny shapes: every job trains, the report holds each job's rate,
target and recurrence backend, the configs it read, and the profile of the job asked for."""

from __future__ import annotations

import json

import pytest
import torch

from hgrn2.ops import small_state
from tests.helpers import load_benchmark

TINY = ["--device", "cpu", "--dtype", "fp32", "--batch-size", "2", "--seq-len", "16", "--grid-size", "4"]
TINY += ["--image-size", "32", "--steps", "2", "--warmup", "1"]
UNCOMPILED = [*TINY, "--no-compile"]  # the configs compile their blocks: Inductor takes minutes on two CPU cores


@pytest.fixture
def benchmark(monkeypatch):
    return load_benchmark("small_state_throughput", monkeypatch)


def test_smoke_run_reports_every_job_against_its_target(benchmark, tmp_path):
    out = tmp_path / "small-state.json"
    profile = ["--profile", "pathfinder", "--profile-steps", "1", "--profile-top", "3"]
    benchmark.main([*UNCOMPILED, *profile, "--out", str(out)])
    report = json.loads(out.read_text())

    assert {"device", "torch", "triton", "timm", "lightning", "triton_cache", "all_targets_met"} <= report.keys()
    assert report["step_kernel_prefetch"] == small_state.PREFETCH  # the step kernels' setting, as run
    jobs = {job["job"]: job for job in report["jobs"]}
    assert list(jobs) == ["listops", "pathfinder", "vision"]
    for name, job in jobs.items():
        rate, value, _ = benchmark.TARGETS[name]
        assert job[rate] > 0, f"{name}: {job}"
        assert job["target"]["value"] == value and job["target"]["met"] is None  # not at the target's shape
        assert job["recurrence_backend"] == "naive"  # what auto picks on the CPU for scans of at most 16 steps
        assert job.get("compiled_blocks", False) is False

    listops, pathfinder, vision = jobs["listops"], jobs["pathfinder"], jobs["vision"]
    assert listops["config"] == "configs/lra/listops.yaml" and listops["init_args"]["preset"] == "listops"
    assert (listops["batch_size"], listops["seq_len"], listops["expand_ratio"]) == (2, 16, 4)
    assert listops["tokens_per_s"] == pytest.approx(listops["steps_per_s"] * 2 * 16, rel=0.01)
    assert "grid_size" not in listops["overrides"]  # --grid-size is for the 2-D encoder only
    assert pathfinder["init_args"]["optim"]["lr"] == 2e-3  # read from configs/lra/pathfinder.yaml
    assert (pathfinder["grid_size"], pathfinder["expand_ratio"]) == ([4, 4], 2)
    assert [run["model"] for run in vision["runs"]] == [benchmark.HGRN2, benchmark.BASELINE]
    assert vision["baseline_images_per_s"] > 0 and vision["speed_vs_baseline"] > 0

    profile = pathfinder["profile"]
    assert profile["sorted_by"] == "self CPU time" and len(profile["kernels"]) == 3
    assert all(row["ms_per_step"] > 0 for row in profile["kernels"]) and profile["calls_per_step"] > 0
    assert "profile" not in listops and "profile" not in vision


def test_the_rate_is_judged_only_at_the_targets_shape(benchmark):
    shape = {"batch_size": 128, "seq_len": 2000}
    assert benchmark.with_target("listops", {"steps_per_s": 30.0}, shape, "bf16")["target"]["met"] is True
    assert benchmark.with_target("listops", {"steps_per_s": 6.8}, shape, "bf16")["target"]["met"] is False
    assert benchmark.with_target("listops", {"steps_per_s": 30.0}, shape, "fp32")["target"]["met"] is None
    smaller = {"batch_size": 64, "seq_len": 2000}
    assert benchmark.with_target("listops", {"steps_per_s": 30.0}, smaller, "bf16")["target"]["met"] is None


def test_unknown_jobs_are_refused(benchmark):
    with pytest.raises(SystemExit):
        benchmark.main(["--jobs", "listops,imagenet", "--device", "cpu"])


def test_compiled_blocks_train_and_are_recorded(benchmark, tmp_path, monkeypatch):
    # without --compile each job follows its config's compile_blocks, which all three set. TorchDynamo traces every
    # block as on a GPU; the eager backend skips Inductor's code generation, which takes minutes on two CPU cores
    compiled = []
    compile_module = torch.nn.Module.compile

    def compile_eagerly(module, *args, **kwargs):
        compiled.append(type(module).__name__)
        compile_module(module, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eagerly)
    torch._dynamo.reset()
    out = tmp_path / "small-state.json"
    benchmark.main([*TINY, "--jobs", "listops,vision", "--out", str(out)])
    jobs = {job["job"]: job for job in json.loads(out.read_text())["jobs"]}

    assert jobs["listops"]["compiled_blocks"] is True and jobs["listops"]["steps_per_s"] > 0
    assert all(run["compiled_blocks"] is True and run["images_per_s"] > 0 for run in jobs["vision"]["runs"])
    # the LRA encoder's 5 blocks, then HGRN2-Tiny's and DeiT-Tiny's 12 each
    assert len(compiled) == 5 + 12 + 12 and torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


def test_a_failing_job_is_recorded_with_its_traceback_and_the_others_still_run(benchmark, tmp_path, monkeypatch):
    run_job = benchmark.run_job

    def fail_on_listops(job, *args):
        if job == "listops":
            raise RuntimeError("kernel launch refused")
        return run_job(job, *args)

    monkeypatch.setattr(benchmark, "run_job", fail_on_listops)
    out = tmp_path / "small-state.json"
    with pytest.raises(SystemExit, match="listops failed"):
        benchmark.main([*UNCOMPILED, "--jobs", "listops,pathfinder", "--out", str(out)])
    jobs = {job["job"]: job for job in json.loads(out.read_text())["jobs"]}

    assert jobs["listops"]["error"] == "failed: RuntimeError: kernel launch refused"
    assert "fail_on_listops" in jobs["listops"]["traceback"]
    assert jobs["pathfinder"]["steps_per_s"] > 0


def test_the_step_kernels_prefetch_is_set_and_recorded(benchmark, tmp_path, monkeypatch):
    monkeypatch.setattr(small_state, "PREFETCH", small_state.PREFETCH)  # restored after the test
    out = tmp_path / "small-state.json"
    benchmark.main([*UNCOMPILED, "--jobs", "pathfinder", "--prefetch", "2", "--out", str(out)])
    assert small_state.PREFETCH == 2 and json.loads(out.read_text())["step_kernel_prefetch"] == 2
    with pytest.raises(SystemExit):  # argparse: only 0, 1 and 2
        benchmark.main([*UNCOMPILED, "--jobs", "pathfinder", "--prefetch", "3", "--out", str(out)])
