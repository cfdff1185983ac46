"""Multi-process training on the CPU (gloo): DDP and FSDP against a single process with the same global batch.

The two-process runs go through the ``hgrn2`` command exactly as a user runs it (``python -m hgrn2 fit
--config ...`` with ``trainer.strategy`` set); Lightning starts the second process itself. FSDP runs use
``CPUFSDPStrategy`` (Lightning's ``FSDPStrategy`` with CPU devices, see ``distributed_helpers``). Each rank
writes its per-step losses, the rows it trained on and its validation metrics to JSON-lines files.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules.text import TextDataModule
from datamodules.tokenizer import build_tokenizer
from lightning_modules.causal_lm import CausalLM
from lightning_modules.cli import main as hgrn2_cli

REPO = Path(__file__).resolve().parents[2]
STEPS, CHECKPOINT_STEP, SEQ_LEN, GLOBAL_BATCH = 6, 3, 32, 4
HELPERS = "tests.lightning_modules.distributed_helpers"
# variables through which a scheduler or launcher would hand a process its rank; the children must not see them
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK")


def _write_corpus(root: Path) -> dict[str, str]:
    """Deterministic pseudo-English lines: train ~24 KB, val ~3 KB, test ~1 KB."""
    rng = random.Random(0)
    vocabulary = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(300)
    ]
    files = {}
    for split, lines in (("train", 480), ("val", 60), ("test", 20)):
        path = root / f"{split}.txt"
        path.write_text("\n".join(" ".join(rng.choices(vocabulary, k=rng.randint(4, 12))) for _ in range(lines)))
        files[split] = str(path)
    return files


def _config(
    run_dir: Path, data_files: dict, cache_dir: Path, devices: int, strategy, checkpoint_every: int = 0, nodes: int = 1
) -> dict:
    callbacks = [{"class_path": f"{HELPERS}.StepRecorder", "init_args": {"out_dir": str(run_dir / "records")}}]
    if checkpoint_every:
        callbacks.append(
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": str(run_dir / "checkpoints"),
                    "filename": "{step}",
                    "every_n_train_steps": checkpoint_every,
                    "save_top_k": -1,
                },
            }
        )
    batch = GLOBAL_BATCH // (devices * nodes)
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "num_nodes": nodes,
            "strategy": strategy,
            "precision": "32-true",
            "max_steps": STEPS,
            "val_check_interval": STEPS,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "gradient_clip_val": 0.1,  # small enough to clip every step: FSDP must clip by the norm over all shards
            "logger": False,
            "enable_checkpointing": bool(checkpoint_every),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run_dir),
            "callbacks": callbacks,
        },
        "model": {
            "class_path": "lightning_modules.causal_lm.CausalLM",
            "init_args": {
                "preset": "tiny",
                # fused AdamW as on GPUs: under FSDP it steps the local (possibly empty) shards
                "optim": {"lr": 1e-2, "warmup_steps": 2, "schedule": "cosine", "fused": True},
            },
        },
        "data": {
            "class_path": f"{HELPERS}.CountingTextDataModule",
            "init_args": {
                "data_files": data_files,
                "tokenizer": "byte",
                "seq_len": SEQ_LEN,
                "batch_size": batch,
                "eval_batch_size": batch,
                "cache_dir": str(cache_dir),
            },
        },
    }


def _write_config(run_dir: Path, config: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


def _launch(config_path: Path, *extra: str) -> str:
    """``python -m hgrn2 fit --config ...`` in a fresh process (Lightning starts the other ranks); its output."""
    return _run_module("hgrn2", "fit", "--config", str(config_path), *extra)


def _run_module(module: str, *args: str) -> str:
    return _wait([_start(module, *args)])[0]


def _start(module: str, *args: str, **env_extra: str) -> tuple[list[str], subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    env.update(env_extra)
    command = [sys.executable, "-m", module, *args]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    return command, process


def _wait(started: list[tuple[list[str], subprocess.Popen]], timeout: float = 240.0) -> list[str]:
    """Wait for every process and return their outputs; on a timeout kill each one's session (the ranks it
    launched) and fail."""
    failures, outputs = [], []
    for command, process in started:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for _, other in started:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(other.pid, signal.SIGKILL)
            output, _ = process.communicate()
        outputs.append(output.decode(errors="replace"))
        if process.returncode != 0:
            failures.append(f"{' '.join(command)} exited with {process.returncode}:\n{outputs[-1][-6000:]}")
    assert not failures, "\n\n".join(failures)
    return outputs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _setup(run_dir: Path, world: int) -> dict:
    """How the module was wrapped, the same on every rank."""
    records = [_records(run_dir, "setup", rank)[-1] for rank in range(world)]
    assert all(r == records[0] for r in records), records
    return records[0]


def _records(run_dir: Path, kind: str, rank: int) -> list[dict]:
    path = run_dir / "records" / f"{kind}-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _global_steps(run_dir: Path, world: int) -> dict[int, dict]:
    """Per step: the loss averaged over ranks (equal token counts) and the rows of the global batch."""
    per_rank = [_records(run_dir, "train", rank) for rank in range(world)]
    steps = {}
    for records in zip(*per_rank):
        assert len({r["step"] for r in records}) == 1, f"ranks disagree on the step: {records}"
        steps[records[0]["step"]] = {
            "loss": float(np.mean([r["loss"] for r in records])),
            "rows": sorted(tuple(row) for r in records for row in r["rows"]),
        }
    return steps


def _cli_in_process(*args: str) -> None:
    """``hgrn2 ...`` in this process, leaving the environment as it was (Lightning sets PL_GLOBAL_SEED)."""
    saved = dict(os.environ)
    try:
        hgrn2_cli(list(args))
    finally:
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        os.environ.update(saved)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distributed")
    return {"root": root, "data_files": _write_corpus(root), "cache": root / "cache"}


@pytest.fixture(scope="module")
def single_process(corpus) -> Path:
    """The reference: one process, the whole global batch, same seed and data."""
    run_dir = corpus["root"] / "single"
    config = _config(run_dir, corpus["data_files"], corpus["cache"], devices=1, strategy="auto")
    _cli_in_process("fit", "--config", str(_write_config(run_dir, config)))
    return run_dir


def _assert_same_steps(actual: dict, expected: dict, steps, tol: float, what: str) -> None:
    for step in steps:
        assert actual[step]["rows"] == expected[step]["rows"], f"{what}: step {step} trained on other rows"
        diff = abs(actual[step]["loss"] - expected[step]["loss"])
        assert diff <= tol, f"{what}: step {step} loss {actual[step]['loss']:.7f} vs {expected[step]['loss']:.7f}"


def _last_val_metrics(run_dir: Path, rank: int) -> dict[str, float]:
    return {k: v for k, v in _records(run_dir, "val", rank)[-1].items() if k.startswith("val/")}


def _assert_val_equal(run_dir: Path, world: int, reference: Path) -> None:
    expected = _last_val_metrics(reference, 0)
    for rank in range(world):
        actual = _last_val_metrics(run_dir, rank)
        assert set(actual) == set(expected) and {"val/loss", "val/accuracy"} <= set(actual)
        for name, value in expected.items():
            close = abs(actual[name] - value) <= 1e-4 * max(1.0, abs(value))
            assert close, f"rank {rank} {name}: {actual} vs one process {expected}"


def test_ddp_two_processes_match_one_process_losses_val_metrics_and_data(corpus, single_process):
    run_dir = corpus["root"] / "ddp"
    cache = corpus["root"] / "ddp-cache"  # empty: this run builds its own token cache
    _launch(_write_config(run_dir, _config(run_dir, corpus["data_files"], cache, devices=2, strategy="ddp")))

    assert _setup(run_dir, 2)["fsdp_units"] == 0
    expected = _global_steps(single_process, 1)
    actual = _global_steps(run_dir, 2)
    assert sorted(actual) == list(range(1, STEPS + 1))
    _assert_same_steps(actual, expected, range(1, STEPS + 1), 1e-4, "DDP vs one process")
    # the two ranks' halves of every global batch are disjoint
    for step, rank0, rank1 in zip(actual, _records(run_dir, "train", 0), _records(run_dir, "train", 1)):
        assert not {tuple(r) for r in rank0["rows"]} & {tuple(r) for r in rank1["rows"]}, f"step {step}"
    _assert_val_equal(run_dir, 2, single_process)
    # the token cache: built by one process, then opened by both ranks from the same files
    markers = sorted(p.name for p in cache.glob("prepare_data-*"))
    assert len(markers) == 1 and markers[0].startswith("prepare_data-rank0-"), markers
    opened = {(cache / f"opened-train-rank{rank}").read_text() for rank in range(2)}
    assert len(opened) == 1 and Path(opened.pop()).parent == cache


def test_two_nodes_launched_by_hand_match_one_process(corpus, single_process):
    """``--trainer.num_nodes 2`` started as on a cluster without a scheduler: one process per node with
    MASTER_ADDR, MASTER_PORT and NODE_RANK (both "nodes" are this machine, one CPU device each)."""
    run_dir, cache = corpus["root"] / "nodes", corpus["root"] / "nodes-cache"
    config = _config(run_dir, corpus["data_files"], cache, devices=1, strategy="ddp", nodes=2)
    config_path, port = _write_config(run_dir, config), str(_free_port())
    command = ("hgrn2", "fit", "--config", str(config_path))
    _wait([_start(*command, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node)) for node in (0, 1)])

    assert _setup(run_dir, 2)["world_size"] == 2
    _assert_same_steps(_global_steps(run_dir, 2), _global_steps(single_process, 1), range(1, STEPS + 1), 1e-4, "nodes")
    _assert_val_equal(run_dir, 2, single_process)
    # each node's local rank 0 prepares the data (here both at once, into one folder); all read the same cache
    markers = sorted(p.name.split("-pid")[0] for p in cache.glob("prepare_data-*"))
    assert markers == ["prepare_data-rank0", "prepare_data-rank1"], markers
    assert len({(cache / f"opened-train-rank{rank}").read_text() for rank in range(2)}) == 1
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name], "a temporary cache file was left behind"


def test_fsdp_sharded_checkpoint_resumes_with_the_losses_of_an_uninterrupted_run_and_consolidates(
    corpus, single_process
):
    strategy = {"class_path": f"{HELPERS}.CPUFSDPStrategy", "init_args": {"state_dict_type": "sharded"}}
    full_dir, resumed_dir = corpus["root"] / "fsdp", corpus["root"] / "fsdp-resumed"
    config = _config(full_dir, corpus["data_files"], corpus["cache"], 2, strategy, checkpoint_every=CHECKPOINT_STEP)
    # a sampled continuation at the end: it depends on every logit, so on every gathered weight
    summary = {"prompt": "the ", "max_new_tokens": 24, "temperature": 1.0, "top_k": None, "seed": 0}
    config["trainer"]["callbacks"].append({"class_path": "lightning_modules.causal_lm.LMSummary", "init_args": summary})
    output = _launch(_write_config(full_dir, config))

    assert _setup(full_dir, 2)["fsdp_units"] == 3  # the tiny preset's two blocks and the root
    uninterrupted = _global_steps(full_dir, 2)
    _assert_same_steps(uninterrupted, _global_steps(single_process, 1), range(1, STEPS + 1), 1e-4, "FSDP vs one")
    _assert_val_equal(full_dir, 2, single_process)
    checkpoint = full_dir / "checkpoints" / f"step={CHECKPOINT_STEP}.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2, "expected one shard file per rank"

    config = _config(resumed_dir, corpus["data_files"], corpus["cache"], 2, strategy)
    _launch(_write_config(resumed_dir, config), "--ckpt_path", str(checkpoint))
    resumed = _global_steps(resumed_dir, 2)
    assert sorted(resumed) == list(range(CHECKPOINT_STEP + 1, STEPS + 1))
    _assert_same_steps(resumed, uninterrupted, resumed, 1e-6, "resumed vs uninterrupted FSDP")

    # the final sharded checkpoint, consolidated into one file, validates in one process as the FSDP run did
    final = full_dir / "checkpoints" / f"step={STEPS}.ckpt"
    _run_module("lightning.pytorch.utilities.consolidate_checkpoint", str(final))
    check_dir = corpus["root"] / "fsdp-consolidated"
    config_path = _write_config(check_dir, _config(check_dir, corpus["data_files"], corpus["cache"], 1, "auto"))
    _cli_in_process("validate", "--config", str(config_path), "--ckpt_path", f"{final}.consolidated")
    _assert_val_equal(check_dir, 1, full_dir)
    # the FSDP run's closing sample (generation outside forward, from the gathered weights) is this model's
    model = CausalLM.load_from_checkpoint(f"{final}.consolidated").model
    tokenizer = build_tokenizer("byte")
    sample = model.generate(torch.tensor([tokenizer.encode("the ")]), 24, temperature=1.0, seed=0)
    assert f"sample (temperature 1.0, top-k None):\n{tokenizer.decode(sample[0])}" in output, output[-3000:]


def test_image_and_sequence_classifiers_train_the_same_under_fsdp_with_checkpointing_as_under_ddp(tmp_path):
    _run_module("tests.lightning_modules.distributed_tasks", str(tmp_path))
    # FSDP units: one per block (2 layers) plus the root, for both models
    for task, units in (("image_task", 3), ("sequence_task", 3)):
        ddp, fsdp = tmp_path / f"{task}-ddp", tmp_path / f"{task}-fsdp"
        assert _setup(ddp, 2) == {
            "world_size": 2,
            "fsdp_units": 0,
            "checkpoint_wrappers": 0,
            "grad_checkpointing": False,
        }
        wrapped = _setup(fsdp, 2)
        assert wrapped["fsdp_units"] == units and (wrapped["checkpoint_wrappers"] or wrapped["grad_checkpointing"])
        for rank in range(2):
            expected, actual = _records(ddp, "train", rank), _records(fsdp, "train", rank)
            assert [r["step"] for r in actual] == [1, 2, 3] and [r["rows"] for r in actual] == [
                r["rows"] for r in expected
            ]
            for a, e in zip(actual, expected):
                assert abs(a["loss"] - e["loss"]) <= 1e-5, f"{task} rank {rank} step {a['step']}: {a} vs {e}"
        # validation metrics are reduced over the ranks: every rank logs the same values, under either strategy
        val = [_records(run, "val", rank)[-1] for run in (ddp, fsdp) for rank in range(2)]
        for record in val[1:]:
            assert record.keys() == val[0].keys() and "val/loss" in record
            assert all(abs(record[k] - val[0][k]) <= 1e-5 for k in record), f"{task}: {val}"


@pytest.mark.parametrize("layout", ["blocks", "streams"])
@pytest.mark.parametrize("world", [2, 3])
def test_text_training_data_is_split_across_ranks_without_repeats(tmp_path, layout, world):
    seq_len, batch, num_tokens = 8, 3, 1000
    data = TextDataModule(seq_len=seq_len, batch_size=batch, train_layout=layout, cache_dir=str(tmp_path))
    data.tokens["train"] = np.arange(num_tokens, dtype=np.int64)  # each token names its own position
    starts_per_rank = []
    for rank in range(world):
        data.trainer = SimpleNamespace(world_size=world, global_rank=rank, current_epoch=0)
        batches = [b["input_ids"] for b in data.train_dataloader()]
        for rows in batches:
            # every row is a contiguous window whose labels are the next tokens
            assert (rows[:, 1:] == rows[:, :-1] + 1).all()
        if layout == "streams":  # row i of batch n+1 continues row i of batch n
            for previous, current in zip(batches, batches[1:]):
                assert (current[:, 0] == previous[:, -1] + 1).all()
        starts_per_rank.append([int(s) for rows in batches for s in rows[:, 0]])
    counts = {len(starts) for starts in starts_per_rank}
    assert len(counts) == 1, f"ranks read different numbers of rows: {counts}"
    starts = [s for per_rank in starts_per_rank for s in per_rank]
    assert len(starts) == len(set(starts)), "a window was read twice in one epoch"
    windows = (num_tokens - 1) // seq_len
    if layout == "blocks":
        assert all(s % seq_len == 0 for s in starts)
        # all windows but fewer than one global batch's worth are read
        assert windows - len(starts) < world * batch
