"""Train one ``hgrn2`` config at several seeds side by side, then score each run's checkpoint on the test split.

    PYTHONPATH=$PWD python experiments/config_seeds.py --config configs/lra/pathfinder_grid_conv.yaml \\
        --seeds 0 1 -- \\
        --data.init_args.data_dir data/lra/pathfinder32 --trainer.max_time 00:00:07:00

For each seed the script runs ``python -m hgrn2 fit --config C --seed_everything S <flags after -->`` in its own
process (all seeds at once, sharing the machine), with a CSV logger under ``--run-dir``/``s<seed>``; once a fit
ends, ``python -m hgrn2 test`` scores the checkpoint it saved last. The JSON at ``--out`` (default
``experiments/results/<gpu>-<config name>-seeds.json``) gathers, per seed:

* ``val_curve``: every validation of the fit as ``[step, val/acc, val/loss]``;
* ``checkpoint_step`` and ``test``: the step of the checkpoint that was tested and its ``test/*`` metrics;
* ``fit_s`` / ``test_s``: wall-clock seconds of the two commands, and their exit codes;

with the command lines, the config's text, and the device. A run that fails keeps its exit code and the tail of
its log in the JSON; the other seeds go on. ``{seed}`` in the flags becomes each run's seed:
``--model.init_args.init_from ckpt/s{seed}.ckpt`` starts each seed from its own checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script (each seed's process is one), the repository's packages import

from benchmarks.gpu_info import gpu_name  # noqa: E402
from datamodules.atomic import write_json_atomically  # noqa: E402


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (the CLI runs there), else as it is; reports
    then name files as a checkout does, wherever the checkout is."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def cli_command(subcommand: str, config: Path, seed: int, run_dir: Path, name: str, flags: list[str]) -> list[str]:
    """The ``python -m hgrn2`` command line of one fit or test, logging to ``run_dir/name`` as CSV."""
    return [
        sys.executable, "-m", "hgrn2", subcommand, "--config", repo_relative(config), "--seed_everything", str(seed),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", repo_relative(run_dir),
        "--trainer.logger.name", name, "--trainer.enable_progress_bar", "false", *flags,
    ]  # fmt: skip


def read_metrics(log_dir: Path) -> list[dict[str, str]]:
    """The rows of the newest ``metrics.csv`` under ``log_dir`` (a CSVLogger's ``<name>/version_<n>``)."""
    files = sorted(log_dir.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not files:
        return []
    with files[-1].open(newline="") as handle:
        return list(csv.DictReader(handle))


def validation_curve(rows: list[dict[str, str]]) -> list[list[float]]:
    """``[step, val/acc, val/loss]`` for every row that logged a validation accuracy."""
    curve = []
    for row in rows:
        if row.get("val/acc"):
            loss = row.get("val/loss")
            curve.append([int(row["step"]), float(row["val/acc"]), float(loss) if loss else None])
    return curve


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``.ckpt`` a fit saved under ``run_dir/fit``."""
    checkpoints = sorted(run_dir.glob("fit/version_*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    return checkpoints[-1] if checkpoints else None


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def run_logged(command: list[str], log: Path) -> tuple[int, float]:
    """Run ``command`` with its output appended to ``log``; returns the exit code and the wall time."""
    start = time.perf_counter()
    with log.open("a") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    return code, time.perf_counter() - start


def run_seed(seed: int, args) -> dict:
    """Fit and test one seed (called in the seed's own process)."""
    run_dir = args.run_dir / f"s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "run.log"
    flags = [flag.replace("{seed}", str(seed)) for flag in args.flags]
    fit = cli_command("fit", args.config, seed, run_dir, "fit", flags)
    fit_code, fit_s = run_logged(fit, log)
    result = {"seed": seed, "fit_command": fit, "fit_exit": fit_code, "fit_s": round(fit_s, 1)}
    result["val_curve"] = validation_curve(read_metrics(run_dir / "fit"))
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        result["error"] = "the fit saved no checkpoint"
        result["log_tail"] = tail(log)
        return result
    result["checkpoint"] = str(checkpoint.relative_to(args.run_dir))
    result["checkpoint_step"] = int(torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"])
    test = cli_command("test", args.config, seed, run_dir, "test", [*flags, "--ckpt_path", repo_relative(checkpoint)])
    test_code, test_s = run_logged(test, log)
    result.update(test_command=test, test_exit=test_code, test_s=round(test_s, 1))
    rows = read_metrics(run_dir / "test")
    result["test"] = {key: float(value) for row in rows for key, value in row.items() if key.startswith("test/")}
    if fit_code or test_code or not result["test"]:
        result["log_tail"] = tail(log)
    return result


def seed_result_path(run_dir: Path, seed: int) -> Path:
    """Where the process of ``seed`` leaves its result for the parent to collect."""
    return run_dir / f"seed-{seed}.json"


def result_file_or_error(path: Path, seed: int, code: int) -> dict:
    """A seed's result, or an error entry when its process wrote none."""
    if path.exists():
        return json.loads(path.read_text())
    return {"seed": seed, "error": f"the seed's process exited with {code} and wrote no result"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="an hgrn2 YAML config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run per seed, side by side")
    parser.add_argument("--out", type=Path, help="the JSON report (default: results/<gpu>-<config>-seeds.json)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/config_seeds"), help="logs and checkpoints")
    parser.add_argument("--only", type=int, help=argparse.SUPPRESS)  # one seed, in a child process
    args = parser.parse_args(own)
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must differ, got {args.seeds}")
    args.argv, args.flags = argv, flags
    if args.out is None:
        args.out = REPO / "experiments" / "results" / f"{gpu_name()}-{args.config.stem}-seeds.json"
    args.config, args.run_dir, args.out = args.config.resolve(), args.run_dir.resolve(), args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.only is not None:
        write_json_atomically(seed_result_path(args.run_dir, args.only), run_seed(args.only, args))
        return {}
    for seed in args.seeds:
        seed_result_path(args.run_dir, seed).unlink(missing_ok=True)
    start = time.perf_counter()
    children = [subprocess.Popen([sys.executable, __file__, "--only", str(seed), *args.argv]) for seed in args.seeds]
    for child in children:
        child.wait()
    runs = [
        result_file_or_error(seed_result_path(args.run_dir, seed), seed, child.returncode)
        for seed, child in zip(args.seeds, children)
    ]
    report = {
        "benchmark": "config_seeds",
        "config": repo_relative(args.config),
        "config_text": args.config.read_text(),
        "flags": args.flags,
        "seeds": args.seeds,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "wall_s": round(time.perf_counter() - start, 1),
        "runs": runs,
    }
    write_json_atomically(args.out, report)
    for run in runs:
        accuracy = run.get("test", {}).get("test/acc")
        shown = "no test accuracy" if accuracy is None else f"test/acc {accuracy:.4f}"
        print(f"seed {run['seed']}: step {run.get('checkpoint_step')}, {shown}", flush=True)
    return report


if __name__ == "__main__":
    main()
