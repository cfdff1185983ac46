"""experiments/compile_parity.py on the CPU at a tiny ListOps length: traced by TorchDynamo and AOTAutograd without
Inductor (``aot_eager``), the model trains exactly as it does eagerly, and its first block is one graph."""

from __future__ import annotations

from tests.helpers import load_experiment


def test_aot_eager_trains_as_eager_and_the_first_block_is_one_graph(monkeypatch):
    script = load_experiment("compile_parity", monkeypatch)
    report = script.main(["--models", "listops", "--backends", "aot_eager", "--batch-size", "2", "--steps", "2",
                          "--seq-len", "24", "--device", "cpu"])  # fmt: skip
    rows = report["models"]["listops"]
    assert rows["first_block_graphs"] == {"graphs": 1, "graph_breaks": 0, "reasons": []}
    assert rows["aot_eager"]["losses"] == rows["eager"]["losses"] and len(rows["eager"]["losses"]) == 2
    assert rows["eager"]["first_non_finite_block"] is None and rows["aot_eager"]["first_non_finite_block"] is None
    assert rows["aot_eager"]["worst_relative_grad_difference"]["value"] < 1e-6
