"""ListOps training steps/s (benchmarks/small_state_throughput.py --jobs listops) under launch settings of the
chunk kernels (``hgrn2.ops.chunk.LAUNCH``), one JSON per setting in --out:

    python experiments/listops_launch.py --out runs/listops_launch small_head_warps=4 small_head_walk_warps=1,2
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from hgrn2.ops import chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("settings", nargs="*", help="KEY=V1,V2,... of LAUNCH; every combination is timed")
    args = parser.parse_args()
    defaults = dict(chunk.LAUNCH)
    axes = []
    for setting in args.settings:
        key, _, values = setting.partition("=")
        try:
            axes.append([chunk.launch_setting(f"{key}={value}") for value in values.split(",")])
        except ValueError as error:
            parser.error(str(error))
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import small_state_throughput  # the chunk op reads LAUNCH at each call, so one import serves every setting

    for combination in itertools.product(*axes):
        chunk.LAUNCH.clear()
        chunk.LAUNCH.update(defaults | dict(combination))
        name = "-".join(f"{k}{v}" for k, v in combination) or "default"
        print(f"=== {name}", flush=True)
        small_state_throughput.main(["--jobs", "listops", "--out", str(args.out / f"listops-{name}.json")])


if __name__ == "__main__":
    main()
