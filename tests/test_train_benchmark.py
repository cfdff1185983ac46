"""benchmarks/train.py's model names with launch settings (the timing itself needs a GPU)."""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark


@pytest.fixture
def benchmark(monkeypatch):
    return load_benchmark("train", monkeypatch)


def test_a_model_name_carries_typed_launch_settings_that_apply_only_while_it_runs(benchmark):
    from hgrn2.ops import chunk

    assert benchmark.model_spec("fla") == ("fla", {})
    name, settings = benchmark.model_spec("hgrn2+half_deltas=true+walk_programs_per_sm=0.5")
    assert (name, settings) == ("hgrn2", {"half_deltas": True, "walk_programs_per_sm": 0.5})
    before = dict(chunk.LAUNCH)
    with benchmark.launch_settings(settings):
        assert chunk.LAUNCH["half_deltas"] is True and chunk.LAUNCH["walk_programs_per_sm"] == 0.5
    assert chunk.LAUNCH == before
    with pytest.raises(RuntimeError), benchmark.launch_settings(settings):
        raise RuntimeError("a failed measurement")
    assert chunk.LAUNCH == before


@pytest.mark.parametrize(
    "spec, words",
    [
        ("mamba", "unknown model 'mamba'"),
        ("hgrn2+half_deltas=maybe", "takes true or false"),
        ("hgrn2+x=1", "KEY=VALUE"),
    ],
)
def test_unknown_models_and_settings_are_refused_by_name(benchmark, spec, words):
    with pytest.raises(ValueError, match=words):
        benchmark.model_spec(spec)
