"""MQAR: every query is answerable from the context, the loss sees only answers, the data follow the seed."""

from __future__ import annotations

import collections
import importlib.util
import itertools
import json
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from datamodules.mqar import (
    IGNORE_INDEX,
    MQARDataModule,
    MQARSpec,
    generate_mqar,
    power_law_gaps,
    sample_distinct,
)
from lightning_modules.cli import main as cli_main


def _check_example(input_ids: list[int], labels: list[int], spec: MQARSpec) -> None:
    """Check one example against the task definition with plain Python loops."""
    n, context = spec.num_pairs, 2 * spec.num_pairs
    keys, values = input_ids[0:context:2], input_ids[1:context:2]
    assert len(set(keys)) == n and len(set(values)) == n, "keys and values are distinct within an example"
    assert all(1 <= k < spec.vocab_size // 2 for k in keys), f"keys outside the key vocabulary: {keys}"
    assert all(spec.vocab_size // 2 <= v < spec.vocab_size for v in values), f"values outside: {values}"
    pair_of = dict(zip(keys, values))
    answers = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
    assert len(answers) == n, f"expected one query per pair ({n}), found {len(answers)}"
    queried = []
    for t in answers:
        assert t >= context and (t - context) % 2 == 0, f"query at {t} is not on a query slot"
        key = input_ids[t]
        # the key was stated earlier, followed by the value that the label asks for
        stated = [s for s in range(0, t - 1) if input_ids[s] == key and s < context and s % 2 == 0]
        assert stated, f"query key {key} at {t} never appears in the context"
        assert input_ids[stated[0] + 1] == labels[t] == pair_of[key]
        queried.append(key)
    assert sorted(queried) == sorted(keys), "every key is queried exactly once"


@pytest.mark.parametrize(
    "seq_len, num_pairs, vocab_size, random_fill",
    [(64, 4, 64, True), (64, 16, 34, False), (256, 16, 8192, True), (51, 12, 1000, True)],
)
def test_every_query_asks_for_the_value_stated_earlier_and_only_answers_carry_labels(
    seq_len, num_pairs, vocab_size, random_fill
):
    spec = MQARSpec(seq_len, num_pairs, vocab_size, random_fill=random_fill)
    input_ids, labels = generate_mqar(spec, 64, seed=3)
    assert input_ids.shape == labels.shape == (64, seq_len)
    assert input_ids.dtype == labels.dtype == torch.int64
    assert 0 <= input_ids.min() and input_ids.max() < vocab_size
    for row_inputs, row_labels in zip(input_ids.tolist(), labels.tolist()):
        _check_example(row_inputs, row_labels, spec)
    # without random fill, everything that is neither context nor query is the filler token 0
    if not random_fill:
        is_query = labels != IGNORE_INDEX
        filler = input_ids[:, 2 * num_pairs :][~is_query[:, 2 * num_pairs :]]
        assert (filler == 0).all()
    else:
        assert (input_ids[:, 2 * num_pairs :] != 0).float().mean() > 0.9


def test_hand_built_example_layout():
    """Two pairs, no fill, queries at slots 0 and 1: the layout is fixed by the definition."""
    spec = MQARSpec(seq_len=8, num_pairs=2, vocab_size=6, random_fill=False)
    # with 2 slots and 2 queries, both slots are taken; keys are {1, 2}, values {3, 4, 5}
    input_ids, labels = generate_mqar(spec, 200, seed=0)
    for row_inputs, row_labels in zip(input_ids.tolist(), labels.tolist()):
        k1, v1, k2, v2 = row_inputs[:4]
        assert {k1, k2} == {1, 2}
        assert row_inputs[5] == row_inputs[7] == 0
        assert row_labels[:4] == [IGNORE_INDEX] * 4 and row_labels[5] == row_labels[7] == IGNORE_INDEX
        answer = {k1: v1, k2: v2}
        assert row_labels[4] == answer[row_inputs[4]] and row_labels[6] == answer[row_inputs[6]]
        assert row_inputs[4] != row_inputs[6]


def test_same_seed_gives_identical_data_and_other_seeds_differ():
    spec = MQARSpec(128, 8, 512)
    a_inputs, a_labels = generate_mqar(spec, 32, seed=7)
    b_inputs, b_labels = generate_mqar(spec, 32, seed=7)
    c_inputs, c_labels = generate_mqar(spec, 32, seed=8)
    assert torch.equal(a_inputs, b_inputs) and torch.equal(a_labels, b_labels)
    assert not torch.equal(a_inputs, c_inputs)
    assert not torch.equal(a_labels != IGNORE_INDEX, c_labels != IGNORE_INDEX)


def test_datamodule_batches_follow_the_contract_and_the_seed():
    def build(seed):
        dm = MQARDataModule(seq_len=64, num_pairs=8, vocab_size=256, num_train=40, num_val=24, batch_size=16, seed=seed)
        dm.setup("fit")
        return dm

    dm, again, other = build(1), build(1), build(2)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == (16, 64)
    assert (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist() == [8] * 16
    for row_inputs, row_labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        _check_example(row_inputs, row_labels, dm.train_spec)
    assert len(dm.train_dataloader()) == 2  # 40 // 16, the last partial batch dropped
    val_batches = list(dm.val_dataloader())
    assert [b["input_ids"].shape[0] for b in val_batches] == [16, 8]  # validation keeps every example
    assert torch.equal(torch.cat([b["input_ids"] for b in val_batches]), dm.val_set.input_ids)
    # same seed: same splits and the same shuffled order; another seed: other data
    assert torch.equal(batch["input_ids"], next(iter(again.train_dataloader()))["input_ids"])
    assert not torch.equal(dm.train_set.input_ids, other.train_set.input_ids)
    # the two splits are independent streams of one seed
    assert not torch.equal(dm.train_set.input_ids[:24], dm.val_set.input_ids)


def test_sample_distinct_is_uniform_over_ordered_samples():
    draws = sample_distinct(np.random.default_rng(0), 60_000, population=5, size=3)
    assert ((draws >= 0) & (draws < 5)).all()
    assert all(len(set(row)) == 3 for row in draws[:1000].tolist())
    counts = collections.Counter(map(tuple, draws.tolist()))
    assert set(counts) == set(itertools.permutations(range(5), 3))  # all 60 ordered triples
    expected = 60_000 / 60
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 110, f"chi² = {chi2:.1f} with 59 degrees of freedom"  # p ≈ 5e-5
    full = sample_distinct(np.random.default_rng(1), 100, population=9, size=9)
    assert (np.sort(full, axis=1) == np.arange(9)).all()


def test_query_gaps_follow_the_power_law_of_zoology():
    """A single draw per row follows p(slot) ∝ (slot + 1) ** (a - 1); the draws are distinct per row."""
    slots, power_a, rows = 6, 0.3, 60_000
    single = power_law_gaps(np.random.default_rng(0), rows, slots, 1, power_a)[:, 0]
    weight = np.arange(1, slots + 1, dtype=float) ** (power_a - 1)
    expected = weight / weight.sum() * rows
    observed = np.bincount(single, minlength=slots)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 30, f"chi² = {chi2:.1f} with 5 degrees of freedom; observed {observed}, expected {expected}"
    several = power_law_gaps(np.random.default_rng(1), 500, slots, 4, power_a)
    assert all(len(set(row)) == 4 for row in several.tolist())
    # a = 0.01 (Zoology's default) puts most queries right after the context
    _, labels = generate_mqar(MQARSpec(512, 16, 8192), 100, seed=0)
    positions = (labels != IGNORE_INDEX).nonzero()[:, 1].float()
    assert positions.median() < 32 + 2 * 40, f"median query position {positions.median()}"
    assert (labels != IGNORE_INDEX).sum().item() == 100 * 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seq_len=60, num_pairs=16), "seq_len must be >= 4·num_pairs"),
        (dict(seq_len=64, num_pairs=16, vocab_size=33), "vocab_size must be >= 2·num_pairs"),
        (dict(num_pairs=0), "num_pairs must be >= 1"),
        (dict(train_power_a=0.0), "power_a must be in"),
        (dict(num_train=0), "num_train must be >= 1"),
        (dict(batch_size=0), "batch_size must be >= 1"),
    ],
)
def test_impossible_parameters_raise_a_value_error_naming_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MQARDataModule(**kwargs)


def test_dataloader_before_setup_raises():
    with pytest.raises(ValueError, match="setup"):
        MQARDataModule(seq_len=64, num_pairs=4).train_dataloader()


# ---------------------------------------------------------------------------------------- the sweep and configs

ROOT = Path(__file__).resolve().parents[2]


def _load_sweep():
    """experiments/ is a folder of scripts, not a package: load the sweep from its path."""
    if "mqar_sweep" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mqar_sweep", ROOT / "experiments" / "mqar_sweep.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["mqar_sweep"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["mqar_sweep"]


def test_sweep_grid_skips_ratios_that_do_not_divide_the_width_and_lengths_too_short():
    sweep = _load_sweep()
    args = sweep.parse_args(
        "--d-models 48 --expand-ratios 1 16 32 --settings 32:4 32:16 64:4 64:16 --lrs 1e-3 3e-3".split()
    )
    points, skipped = sweep.build_grid(args)
    # T=32 fits 4 pairs only; 32 does not divide 48; HGRN1 once per width; two learning rates
    shapes = sorted({(p.model, p.expand_ratio, p.seq_len, p.num_pairs) for p in points})
    assert shapes == [
        (model, e, seq_len, pairs)
        for model, e in [("hgrn1", 1), ("hgrn2", 1), ("hgrn2", 16)]
        for seq_len, pairs in [(32, 4), (64, 4), (64, 16)]
    ]
    assert len(points) == 2 * len(shapes)
    assert {p.state_size for p in points if p.expand_ratio == 16} == {48 * 16}
    reasons = [s["reason"] for s in skipped]
    assert any("not a multiple of expand_ratio 32" in r for r in reasons)
    assert any("seq_len < 4·num_pairs" in r for r in reasons)
    with pytest.raises(SystemExit):  # argparse names the expected SEQ_LEN:NUM_PAIRS form
        sweep.parse_args(["--settings", "256x16"])


def test_hgrn1_and_hgrn2_have_equal_parameters_at_every_expand_ratio():
    sweep = _load_sweep()
    args = sweep.parse_args("--vocab-size 64 --glu-ratio 2".split())
    d, layers = 32, 2
    counts = {}
    for model, e in [("hgrn1", 1)] + [("hgrn2", e) for e in (1, 2, 4, 8, 16, 32)]:
        module = sweep.build_module(sweep.GridPoint(model, d, e, 64, 4, 1e-3, 0), args)
        counts[(model, e)] = module.model.num_parameters()
        assert module.config.state_size == d * e
    # embedding (tied) + per layer: block norms (none), 4 D×D mixer projections, GLU 3·D·2D; lower bounds L·D
    expected = 64 * d + layers * (4 * d * d + 3 * d * 2 * d) + layers * d
    assert set(counts.values()) == {expected}, counts
    # the output scale is the paper's 1 unless --fla-scale asks for K^-1/2
    point = sweep.GridPoint("hgrn2", d, 16, 64, 4, 1e-3, 0)
    assert sweep.build_module(point, args).model.blocks[0].mixer.scale == 1.0
    scaled = sweep.build_module(point, sweep.parse_args("--vocab-size 64 --fla-scale".split()))
    assert scaled.model.blocks[0].mixer.scale == pytest.approx(16**-0.5)


def test_sweep_summary_takes_the_seed_mean_then_the_best_learning_rate():
    sweep = _load_sweep()

    def run(model, e, lr, seed, accuracy):
        return dict(
            model=model, d_model=8, expand_ratio=e, seq_len=64, num_pairs=4, lr=lr, seed=seed,
            val_accuracy=accuracy, state_size=8 * e, params=100,
        )  # fmt: skip

    runs = [
        run("hgrn1", 1, 1e-3, 0, 0.2), run("hgrn1", 1, 1e-3, 1, 0.4), run("hgrn1", 1, 3e-3, 0, 0.1),
        run("hgrn2", 2, 1e-3, 0, 0.5), run("hgrn2", 2, 3e-3, 0, 0.7), run("hgrn2", 2, 3e-3, 1, 0.9),
        run("hgrn2", 4, 1e-3, 0, 0.6), run("hgrn2", 4, 3e-3, 0, 0.65),
    ]  # fmt: skip
    best = {(r["model"], r["expand_ratio"]): r for r in sweep.best_per_point(runs)}
    assert best["hgrn1", 1]["val_accuracy"] == pytest.approx(0.3) and best["hgrn1", 1]["best_lr"] == 1e-3
    assert best["hgrn2", 2]["val_accuracy"] == pytest.approx(0.8) and best["hgrn2", 2]["seeds"] == 2
    assert best["hgrn2", 4]["val_accuracy"] == pytest.approx(0.65)
    (summary,) = sweep.summarize(sweep.best_per_point(runs))
    assert summary["hgrn2_never_drops_as_expand_ratio_grows"] is False  # 0.8 then 0.65
    assert summary["hgrn2_minus_hgrn1_by_expand_ratio"] == {"2": pytest.approx(0.5), "4": pytest.approx(0.35)}
    assert summary["equal_parameters"] is True


def test_sweep_runs_end_to_end_on_a_one_point_cpu_grid(tmp_path):
    sweep = _load_sweep()
    argv = (
        f"--out {tmp_path} --models hgrn2 --d-models 16 --expand-ratios 4 --settings 32:4 --workers 1 "
        "--steps 4 --warmup-steps 1 --vocab-size 64 --num-train 64 --num-val 32 --batch-tokens 512 "
        "--accelerator cpu --precision 32-true"
    ).split()
    sweep.main(argv)
    document = json.loads((tmp_path / "mqar_sweep.json").read_text())
    (record,) = document["runs"]
    assert record["key"] == "hgrn2-d16-e4-T32-N4-lr0.01-s0" and record["steps"] == 4
    assert 0.0 <= record["val_accuracy"] <= 1.0 and math.isfinite(record["val_loss"])
    assert record["num_heads"] == 4 and record["state_size"] == 16 * 4
    assert record["params"] == record["params_closed_form"]
    assert record["mixer_params"] == 2 * 4 * 16 * 16  # two layers of W_q, W_f, W_i, W_o
    assert document["summary"][0]["hgrn2_accuracy_by_expand_ratio"] == {"4": record["val_accuracy"]}
    assert (tmp_path / "mqar_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert record["val_accuracy_by_step"] == []  # no --val-every: validated once, at the end
    # resuming a finished sweep trains nothing and keeps the record
    (best,) = sweep.main(argv + ["--resume"])
    assert best["val_accuracy"] == record["val_accuracy"]
    # the plot can be drawn from the JSON alone (e.g. on a machine with matplotlib after a GPU run without it)
    (tmp_path / "mqar_sweep.png").unlink()
    sweep.main(argv + ["--plot-only"])
    assert (tmp_path / "mqar_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_records_a_learning_curve_with_val_every(tmp_path):
    sweep = _load_sweep()
    argv = (
        f"--out {tmp_path} --models hgrn1 --d-models 16 --settings 32:4 --workers 1 --steps 6 --val-every 2 "
        "--warmup-steps 1 --vocab-size 64 --num-train 16 --num-val 32 --batch-tokens 256 "
        "--accelerator cpu --precision 32-true"
    ).split()  # 8 sequences a step: two steps an epoch, so the curve spans epochs
    sweep.main(argv)
    (record,) = json.loads((tmp_path / "mqar_sweep.json").read_text())["runs"]
    assert [step for step, _ in record["val_accuracy_by_step"]] == [2, 4, 6]
    assert record["val_accuracy_by_step"][-1][1] == pytest.approx(record["val_accuracy"], abs=1e-4)


def test_sweep_without_matplotlib_keeps_the_json_and_says_how_to_plot(tmp_path, monkeypatch, capsys):
    sweep = _load_sweep()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert sweep.try_plot([], tmp_path / "mqar_sweep.png") is False
    assert "--plot-only" in capsys.readouterr().out and not (tmp_path / "mqar_sweep.png").exists()
    with pytest.raises(FileNotFoundError, match="run the sweep first"):
        sweep.main(["--out", str(tmp_path), "--plot-only"])


@pytest.mark.parametrize("extra", [[], ["configs/mqar/hgrn1.yaml"]])
def test_mqar_configs_train_and_validate_through_the_cli(tmp_path, extra):
    configs = [arg for path in ["configs/mqar/base.yaml", *extra] for arg in ("--config", str(ROOT / path))]
    overrides = [
        "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.seq_len=64", "--data.init_args.num_train=16", "--data.init_args.num_val=8",
        "--data.init_args.batch_size=8",
    ]  # fmt: skip
    cli_metrics = {}
    original = pl.Trainer.fit

    def fit_and_capture(self, *args, **kwargs):
        original(self, *args, **kwargs)
        cli_metrics.update({k: float(v) for k, v in self.callback_metrics.items()})
        cli_metrics["mixer"] = type(self.lightning_module.model.blocks[0].mixer).__name__

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pl.Trainer, "fit", fit_and_capture)
        cli_main(["fit", *configs, *overrides])
    assert 0.0 <= cli_metrics["val/accuracy"] <= 1.0
    assert cli_metrics["mixer"] == ("HGRU1" if extra else "HGRU2")


def test_a_failing_sweep_run_is_recorded_and_left_out_of_the_table(tmp_path):
    sweep = _load_sweep()
    args = sweep.parse_args(f"--out {tmp_path} --accelerator cpu --precision 32-true".split())
    bad = sweep.GridPoint("hgrn2", 16, 4, seq_len=8, num_pairs=4, lr=1e-3, seed=0)  # 4 pairs need T >= 16
    record = sweep._run_point_star((bad, args))
    assert record["key"] == bad.key and "seq_len (8) is too short" in record["error"]
    best = sweep.write_results(args, [record], [], tmp_path / "sweep.json", elapsed_s=1.0)
    document = json.loads((tmp_path / "sweep.json").read_text())
    assert best == [] and document["runs"] == [] and document["failed"][0]["key"] == bad.key
