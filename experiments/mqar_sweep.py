"""MQAR state-expansion sweep: does a larger recurrent state (HGRN2's expand_ratio) buy recall?

Trains 2-layer HGRN1 and HGRN2 language models on multi-query associative recall (``datamodules.mqar``) over
a grid of model width (``--d-models``), HGRN2 expand ratio (``--expand-ratios``), sequence length
and number of key–value pairs (``--settings T:N ...``), learning rate (``--lrs``) and seed
(``--seeds``), and writes to ``--out``:

* ``mqar_sweep.json``: the arguments, one record per run (validation accuracy on the answer tokens, loss,
  parameter count, recurrent state size, wall time) and a summary per (width, length, pairs); rewritten
  atomically after every run, so an interrupted sweep keeps what finished (``--resume`` continues it);
* ``mqar_sweep.png``: validation accuracy against state size per layer (D·e for HGRN2, D for HGRN1),
  one panel per (length, pairs), the best learning rate per point (as in Zoology), averaged over seeds.

HGRN2 with expand ratio e has D / e heads of size e, so e must divide D; other points are skipped and listed.
Both mixers project with four D×D matrices, so at one width every model has the same parameter count.
``--short-conv k`` puts a causal convolution of k taps before every mixer, as Zoology's MQAR models do (they use
3); the default, 0, is the paper's HGRN2. On the CPU it did not change whether a 2-layer HGRN2 learned the task
(``experiments/results/learning-notes.md``).

Example (a CPU smoke run)::

    PYTHONPATH=. python experiments/mqar_sweep.py --d-models 32 --expand-ratios 1 4 --settings 64:4 \\
        --workers 1 --steps 20 --vocab-size 128 --num-train 256 --num-val 64 --batch-tokens 2048 \\
        --accelerator cpu --precision 32-true --out /tmp/mqar_smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing
import os
import platform
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from datamodules.atomic import write_atomically

RESULTS_NAME, PLOT_NAME = "mqar_sweep.json", "mqar_sweep.png"
MIXERS = {"hgrn1": "hgru1", "hgrn2": "hgru2"}
SHAPE = ("model", "d_model", "expand_ratio", "seq_len", "num_pairs")  # a point of the plot: runs differ in lr, seed


@dataclass(frozen=True)
class GridPoint:
    """One training run."""

    model: str  # "hgrn1" or "hgrn2"
    d_model: int
    expand_ratio: int  # 1 for HGRN1
    seq_len: int
    num_pairs: int
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return (
            f"{self.model}-d{self.d_model}-e{self.expand_ratio}-T{self.seq_len}-N{self.num_pairs}"
            f"-lr{self.lr:g}-s{self.seed}"
        )

    @property
    def state_size(self) -> int:
        """Recurrent state elements per sample and layer: H·K·V = D·e for HGRN2, D for HGRN1."""
        return self.d_model * self.expand_ratio


def build_grid(args: argparse.Namespace) -> tuple[list[GridPoint], list[dict]]:
    """The runs to do, ordered so that runs on the same data follow each other, and the skipped points."""
    points, skipped = [], []
    for (seq_len, num_pairs), d_model in itertools.product(args.settings, args.d_models):
        if seq_len < 4 * num_pairs:
            skipped.append(dict(seq_len=seq_len, num_pairs=num_pairs, reason="seq_len < 4·num_pairs"))
            continue
        for model in args.models:
            ratios = [1] if model == "hgrn1" else args.expand_ratios
            for ratio in ratios:
                if d_model % ratio:
                    reason = f"d_model {d_model} is not a multiple of expand_ratio {ratio}"
                    skipped.append(dict(model=model, d_model=d_model, expand_ratio=ratio, reason=reason))
                    continue
                for lr, seed in itertools.product(args.lrs, args.seeds):
                    points.append(GridPoint(model, d_model, ratio, seq_len, num_pairs, lr, seed))
    unique_skips = [dict(s) for s in {tuple(sorted(s.items())) for s in skipped}]
    return points, sorted(unique_skips, key=lambda s: sorted(s.items()))


def build_module(point: GridPoint, args: argparse.Namespace):
    """The LightningModule of one run: a 2-layer LM (``--num-layers``) trained with AdamW and cosine decay."""
    from lightning_modules.causal_lm import CausalLM
    from lightning_modules.optim import OptimizerConfig

    overrides = dict(
        hidden_size=point.d_model,
        num_layers=args.num_layers,
        expand_ratio=point.expand_ratio,
        glu_hidden_size=args.glu_ratio * point.d_model,
        mixer=MIXERS[point.model],
        scale=None if args.fla_scale else 1.0,
        short_conv=args.short_conv,
    )
    optim = OptimizerConfig(
        lr=point.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, total_steps=args.steps
    )
    return CausalLM(preset="tiny", vocab_size=args.vocab_size, overrides=overrides, optim=optim)


# The splits of the last data setting this process generated: grid points of one setting run one after another.
_DATA_CACHE: dict[tuple, tuple] = {}


def batch_size(point: GridPoint, args: argparse.Namespace) -> int:
    """Examples per batch: ``--batch-tokens`` tokens (Zoology: 256 × 256 and 128 × 512), at least one."""
    return max(1, args.batch_tokens // point.seq_len)


def _learning_curve_callback(label: str):
    """A callback that records ``[step, validation accuracy]`` after every validation during training and prints
    it with ``label``, so that a run cut off before its end still leaves its curve in the log."""
    import lightning.pytorch as pl

    class LearningCurve(pl.Callback):
        def __init__(self):
            self.points: list[list[float]] = []

        def on_validation_end(self, trainer, pl_module):  # after the epoch-end metrics are logged
            if not trainer.sanity_checking and "val/accuracy" in trainer.callback_metrics:
                self.points.append([trainer.global_step, round(float(trainer.callback_metrics["val/accuracy"]), 4)])
                print(f"{label} step {self.points[-1][0]}: val accuracy {self.points[-1][1]:.4f}", flush=True)

    return LearningCurve()


def run_point(point: GridPoint, args: argparse.Namespace) -> dict:
    """Train one grid point and validate it; returns its record."""
    import lightning.pytorch as pl
    import torch

    from datamodules.mqar import MQARDataModule
    from hgrn2.models.lm import count_parameters

    if args.workers > 1:  # share the host's cores between the runs trained at once
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.workers))
    pl.seed_everything(point.seed, workers=True, verbose=False)
    data = MQARDataModule(
        seq_len=point.seq_len,
        num_pairs=point.num_pairs,
        vocab_size=args.vocab_size,
        num_train=args.num_train,
        num_val=args.num_val,
        batch_size=batch_size(point, args),
        random_fill=args.random_fill,
        seed=point.seed,
    )
    data_key = (point.seq_len, point.num_pairs, point.seed)  # the other data settings are fixed for a sweep
    if data_key in _DATA_CACHE:
        data.train_set, data.val_set = _DATA_CACHE[data_key]
    else:
        data.setup("fit")
        _DATA_CACHE.clear()  # one split pair per process: at T=512, 100k examples take 0.8 GB
        _DATA_CACHE[data_key] = (data.train_set, data.val_set)
    module = build_module(point, args)
    config = module.config
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    device = dict(accelerator=args.accelerator, devices=1, precision=args.precision)
    curve = _learning_curve_callback(point.key)
    validation = dict(limit_val_batches=0)
    if args.val_every:  # validate every --val-every steps, counted across epochs
        validation = dict(val_check_interval=args.val_every, check_val_every_n_epoch=None)
    trainer = pl.Trainer(
        max_steps=args.steps, num_sanity_val_steps=0, callbacks=[curve], **validation, **device, **quiet
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_s = time.perf_counter() - start
    # a fresh Trainer: the training one has validation switched off
    metrics = pl.Trainer(**device, **quiet).validate(module, datamodule=data, verbose=False)[0]
    wall_s = time.perf_counter() - start
    mixer_params = sum(p.numel() for block in module.model.blocks for p in block.mixer.parameters())
    return dict(
        **dataclasses.asdict(point),
        key=point.key,
        num_heads=config.num_heads,
        state_size=point.state_size,
        params=module.model.num_parameters(),
        params_closed_form=count_parameters(config),
        mixer_params=mixer_params,
        val_accuracy=float(metrics["val/accuracy"]),
        val_loss=float(metrics["val/loss"]),
        val_accuracy_by_step=curve.points,
        steps=int(trainer.global_step),
        batch_size=batch_size(point, args),
        train_s=round(train_s, 2),
        steps_per_s=round(trainer.global_step / train_s, 2),
        wall_s=round(wall_s, 2),
    )


def _run_point_star(job: tuple[GridPoint, argparse.Namespace]) -> dict:
    """``run_point`` that reports a failure (out of memory, a kernel error) as a record instead of raising,
    so that one bad point does not cost the rest of a time-boxed sweep."""
    point, args = job
    try:
        return run_point(point, args)
    except Exception as error:  # reported in the JSON and on stdout
        return dict(**dataclasses.asdict(point), key=point.key, error=f"{type(error).__name__}: {error}"[:2000])


def best_per_point(runs: list[dict]) -> list[dict]:
    """Mean accuracy over seeds, then the best learning rate, per (model, width, ratio, length, pairs)."""
    by_lr: dict[tuple, list[dict]] = {}
    for run in runs:
        by_lr.setdefault((*(run[name] for name in SHAPE), run["lr"]), []).append(run)
    best: dict[tuple, dict] = {}
    for (*shape, lr), group in by_lr.items():
        accuracy = statistics.fmean(r["val_accuracy"] for r in group)
        shape = tuple(shape)
        if shape not in best or accuracy > best[shape]["val_accuracy"]:
            best[shape] = dict(
                zip(SHAPE, shape),
                best_lr=lr,
                val_accuracy=accuracy,
                seeds=len(group),
                state_size=group[0]["state_size"],
                params=group[0]["params"],
            )
    order = ("seq_len", "num_pairs", "d_model", "model", "state_size")
    return sorted(best.values(), key=lambda r: tuple(r[name] for name in order))


def summarize(best: list[dict]) -> list[dict]:
    """Per (width, length, pairs): HGRN2 accuracy by expand ratio, whether it never drops as e grows,
    and HGRN2 (each e) against HGRN1 at the same parameter count."""
    summary = []
    groups = itertools.groupby(best, key=lambda r: (r["seq_len"], r["num_pairs"], r["d_model"]))
    for (seq_len, num_pairs, d_model), rows in groups:
        rows = list(rows)
        hgrn2 = {r["expand_ratio"]: r["val_accuracy"] for r in rows if r["model"] == "hgrn2"}
        hgrn1 = next((r["val_accuracy"] for r in rows if r["model"] == "hgrn1"), None)
        accuracies = [hgrn2[e] for e in sorted(hgrn2)]
        entry = dict(seq_len=seq_len, num_pairs=num_pairs, d_model=d_model, hgrn1_accuracy=hgrn1)
        entry["hgrn2_accuracy_by_expand_ratio"] = {str(e): hgrn2[e] for e in sorted(hgrn2)}
        entry["hgrn2_never_drops_as_expand_ratio_grows"] = all(b >= a for a, b in zip(accuracies, accuracies[1:]))
        if hgrn1 is not None:
            entry["hgrn2_minus_hgrn1_by_expand_ratio"] = {str(e): hgrn2[e] - hgrn1 for e in sorted(hgrn2)}
        params = {r["params"] for r in rows}
        entry["equal_parameters"] = len(params) == 1
        summary.append(entry)
    return summary


def plot(best: list[dict], path: Path) -> None:
    """Accuracy against state size per layer, one panel per (length, pairs), one line per model and width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["seq_len"], r["num_pairs"]) for r in best})
    widths = sorted({r["d_model"] for r in best})
    colors = dict(zip(widths, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax, (seq_len, num_pairs) in zip(axes.flat, panels):
        for d_model in widths:
            mine = [r for r in best if (r["seq_len"], r["num_pairs"], r["d_model"]) == (seq_len, num_pairs, d_model)]
            hgrn2 = sorted((r["state_size"], r["val_accuracy"]) for r in mine if r["model"] == "hgrn2")
            hgrn1 = [(r["state_size"], r["val_accuracy"]) for r in mine if r["model"] == "hgrn1"]
            if hgrn2:
                ax.plot(*zip(*hgrn2), "o-", color=colors[d_model], label=f"HGRN2 d={d_model}")
            if hgrn1:
                ax.plot(*zip(*hgrn1), "s", color=colors[d_model], mfc="none", ms=9, label=f"HGRN1 d={d_model}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"T = {seq_len}, {num_pairs} pairs")
        ax.set_xlabel("recurrent state per layer (elements)")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("MQAR validation accuracy")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    axes.flat[0].set_ylim(-0.02, 1.02)
    axes.flat[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    write_atomically(path, lambda handle: fig.savefig(handle, format="png", dpi=120), binary=True)
    plt.close(fig)


def _environment(args: argparse.Namespace) -> dict:
    import lightning
    import torch

    device = torch.cuda.get_device_name(0) if args.accelerator != "cpu" and torch.cuda.is_available() else "cpu"
    return dict(
        python=platform.python_version(), torch=torch.__version__, lightning=lightning.__version__, device=device
    )


def write_results(args, runs, skipped, path: Path, elapsed_s: float) -> list[dict]:
    failed = [r for r in runs if "error" in r]
    runs = [r for r in runs if "error" not in r]
    best = best_per_point(runs)
    document = dict(
        arguments={k: v for k, v in vars(args).items() if k not in ("out", "resume", "plot_only")},
        environment=_environment(args),
        elapsed_s=round(elapsed_s, 1),
        runs=sorted(runs, key=lambda r: r["key"]),
        best=best,
        summary=summarize(best),
        skipped=skipped,
        failed=sorted(failed, key=lambda r: r["key"]),
    )
    write_atomically(path, lambda handle: json.dump(document, handle, indent=1))
    return best


def _setting(text: str) -> tuple[int, int]:
    try:
        seq_len, num_pairs = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SEQ_LEN:NUM_PAIRS such as 256:16, got {text!r}") from None
    return seq_len, num_pairs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("experiments/results"), help="output folder")
    p.add_argument("--models", nargs="+", choices=sorted(MIXERS), default=["hgrn1", "hgrn2"])
    p.add_argument("--d-models", nargs="+", type=int, default=[64, 128])
    p.add_argument("--expand-ratios", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument(
        "--settings", nargs="+", type=_setting, default=[(256, 16), (512, 64)], help="T:N, sequence length:pairs"
    )
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-2], help="best per point is reported")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps per run")
    p.add_argument("--batch-tokens", type=int, default=65_536, help="batch size = batch_tokens // seq_len")
    p.add_argument("--val-every", type=int, default=0, help="also validate every N steps: a learning curve per run")
    p.add_argument("--num-train", type=int, default=100_000)
    p.add_argument("--num-val", type=int, default=1_000)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--random-fill", action="store_true", help="random filler tokens instead of 0")
    p.add_argument("--fla-scale", action="store_true", help="HGRN2 output scale K^-1/2 (fla) instead of 1 (paper)")
    p.add_argument(
        "--short-conv",
        type=int,
        default=0,
        help="taps of a causal convolution before each mixer, as in Zoology's models (default 0: none, the paper's)",
    )
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--glu-ratio", type=int, default=2, help="GLU hidden size = glu_ratio · d_model (0: no GLU)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--workers", type=int, default=4, help="runs trained at once (processes sharing the device)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out and do the rest")
    p.add_argument("--plot-only", action="store_true", help="only draw the PNG from the JSON in --out")
    args = p.parse_args(argv)
    for name in ("steps", "batch_tokens", "workers", "num_layers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def try_plot(best: list[dict], path: Path) -> bool:
    """Draw the plot where matplotlib is installed; otherwise say how to draw it later and go on."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"matplotlib is not installed: {path.name} not drawn; run again with --plot-only where it is")
        return False
    plot(best, path)
    return True


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    path = args.out / RESULTS_NAME
    if args.plot_only:
        if not path.exists():
            raise FileNotFoundError(f"--plot-only draws {path}, which does not exist; run the sweep first")
        best = json.loads(path.read_text())["best"]
        try_plot(best, args.out / PLOT_NAME)
        return best
    points, skipped = build_grid(args)
    runs: list[dict] = []
    if args.resume and path.exists():
        wanted = {p.key for p in points}
        runs = [r for r in json.loads(path.read_text())["runs"] if r["key"] in wanted]  # failed runs are redone
    done = {r["key"] for r in runs}
    todo = [p for p in points if p.key not in done]
    print(f"MQAR sweep: {len(points)} runs ({len(done)} already done), {len(skipped)} skipped", flush=True)
    start = time.perf_counter()
    jobs = [(point, args) for point in todo]
    pool = multiprocessing.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    results = map(_run_point_star, jobs) if pool is None else pool.imap_unordered(_run_point_star, jobs)
    # `timeout` and schedulers stop with SIGTERM: turn it into an exception so the workers are stopped too
    previous_handler = signal.signal(signal.SIGTERM, _raise_system_exit)
    completed = False
    try:
        for i, record in enumerate(results, 1):
            runs.append(record)
            best = write_results(args, runs, skipped, path, time.perf_counter() - start)
            if "error" in record:
                print(f"[{i}/{len(todo)}] {record['key']} FAILED: {record['error']}", flush=True)
                continue
            try_plot(best, args.out / PLOT_NAME)  # after every run, so a stopped sweep leaves a matching plot
            elapsed = time.perf_counter() - start
            print(
                f"[{i}/{len(todo)}] {record['key']}: accuracy {record['val_accuracy']:.3f}, "
                f"{record['steps_per_s']:.1f} steps/s, {record['wall_s']:.1f} s, params {record['params']:,}; "
                f"elapsed {elapsed:.0f} s, about {elapsed / i * (len(todo) - i):.0f} s to go",
                flush=True,
            )
        completed = True
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if pool is not None and completed:
            pool.close()
        elif pool is not None:
            pool.terminate()
        if pool is not None:
            pool.join()
    best = write_results(args, runs, skipped, path, time.perf_counter() - start)
    if best:
        try_plot(best, args.out / PLOT_NAME)
    print(f"wrote {path} and {args.out / PLOT_NAME} in {time.perf_counter() - start:.0f} s", flush=True)
    return best


def _raise_system_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
