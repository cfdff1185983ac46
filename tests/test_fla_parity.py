"""benchmarks/fla_parity.py without fla: a stand-in for fla's HGRN2ForCausalLM (the float64 forward of
tests/models/foreign_checkpoints.py behind fla's call signature and folder layout) passes both directions, a
stand-in that computes something else fails loudly, and the greedy tie rule is the one its docstring states."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.helpers import load_benchmark
from tests.models.foreign_checkpoints import fla_config, fla_logits, fla_weights, write_folder

TINY = {"tiny": dict(hidden_size=32, num_hidden_layers=2, expand_ratio=8, intermediate_size=48, vocab_size=50)}
FLAGS = ["--device", "cpu", "--seq-len", "20", "--prompt-len", "5", "--new-tokens", "8"]


class StandInFla(nn.Module):
    """fla's calling convention (input_ids, past_key_values, use_cache -> .logits, .past_key_values) around the
    float64 reference; its "cache" is the tokens seen so far. ``skip_lower_bounds`` makes it a wrong model."""

    def __init__(self, config: dict, weights: dict, skip_lower_bounds: bool = False):
        super().__init__()
        self.config, self.weights = config, weights
        self.skip_lower_bounds = skip_lower_bounds

    def forward(self, input_ids, past_key_values=None, use_cache=False):
        seen = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids], dim=1)
        config = {**self.config, "use_lower_bound": self.config["use_lower_bound"] and not self.skip_lower_bounds}
        logits = fla_logits(config, self.weights, seen.cpu())[:, -input_ids.shape[1] :]
        return SimpleNamespace(logits=logits.float(), past_key_values=seen if use_cache else None)


def stand_in_api(parity, skip_lower_bounds: bool = False):
    def random_model(shape: dict, seed: int) -> StandInFla:
        config = fla_config(**shape)
        return StandInFla(config, fla_weights(config, seed=seed), skip_lower_bounds)

    def save(model: StandInFla, folder: Path) -> None:
        write_folder(folder, model.config, model.weights)

    def load(folder: Path) -> StandInFla:
        config = {"use_lower_bound": True, **json.loads((folder / "config.json").read_text())}
        return StandInFla(config, load_file(folder / "model.safetensors"), skip_lower_bounds)

    return parity.FlaApi(version="stand-in", random_model=random_model, save=save, load=load)


@pytest.fixture
def parity(monkeypatch):
    return load_benchmark("fla_parity", monkeypatch)


def test_a_faithful_stand_in_passes_both_directions_and_the_report_says_so(parity, tmp_path):
    out = tmp_path / "parity.json"
    assert parity.main([*FLAGS, "--out", str(out)], api=stand_in_api(parity), shapes=TINY) == 0
    report = json.loads(out.read_text())
    assert report["passed"] and [c["direction"] for c in report["results"]] == ["fla->ours", "ours->fla"]
    for case in report["results"]:
        assert case["logits"]["relative_error"] < 1e-5 and case["logits"]["reference_vs_float64"] < 1e-5
        assert case["greedy"]["identical"] and len(case["greedy"]["ours"]) == 8


def test_a_stand_in_that_computes_something_else_fails_with_exit_status_1(parity, tmp_path, capsys):
    out = tmp_path / "parity.json"
    api = stand_in_api(parity, skip_lower_bounds=True)
    assert parity.main([*FLAGS, "--out", str(out)], api=api, shapes=TINY) == 1
    report = json.loads(out.read_text())
    assert not report["passed"] and all(not c["logits"]["passed"] for c in report["results"])
    assert "FAIL tiny fla->ours" in capsys.readouterr().out


def test_a_case_that_raises_is_a_failure_with_its_error_and_the_next_direction_is_not_skipped_silently(
    parity, tmp_path
):
    api = stand_in_api(parity)
    api.save = lambda model, folder: (_ for _ in ()).throw(OSError(f"cannot write {folder.name}"))
    out = tmp_path / "parity.json"
    assert parity.main([*FLAGS, "--out", str(out)], api=api, shapes=TINY) == 1
    cases = json.loads(out.read_text())["results"]
    assert "OSError: cannot write tiny-fla" in cases[0]["error"] and "not run" in cases[1]["error"]


class FixedLogits(nn.Module):
    """A "model" whose next-token logits are fixed: the greedy choice is their argmax."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, input_ids=None, use_cache=False, **_):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1).clone())


@pytest.mark.parametrize(
    "ours, reference, strict, tie, passed",
    [
        ([0.0, 1.0005, 1.0], [0.0, 1.0, 1.0004], False, True, True),  # gap 4e-4 <= 2 × 5e-4: a tie, passes
        ([0.0, 1.0005, 1.0], [0.0, 1.0, 1.0004], True, True, False),  # --strict: identical or fail
        ([0.0, 1.2, 1.0], [0.0, 1.0, 1.3], False, False, False),  # gap 0.3 > 2 × 5e-4: a real difference
    ],
)
def test_greedy_continuations_may_part_only_at_a_tie_within_twice_the_measured_logit_error(
    parity, ours, reference, strict, tie, passed
):
    prompt = torch.zeros(1, 2, dtype=torch.long)
    mine, ref = torch.tensor([1]), torch.tensor([2])  # each model's argmax
    result = parity.tie_check(FixedLogits(ours), FixedLogits(reference), prompt, mine, ref, strict, error=5e-4)
    assert result["first_difference"] == 0 and result["tie_within_error"] is tie and result["passed"] is passed
