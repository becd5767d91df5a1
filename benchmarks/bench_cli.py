"""How long the ``resclip`` command line takes to answer (wall time of a fresh process).

    .venv/bin/python benchmarks/bench_cli.py              # this checkout
    .venv/bin/python benchmarks/bench_cli.py --src DIR    # another copy's src/ folder (e.g. an older commit)

Each command runs ``--repeat`` times (default 5) as ``python -c "...resclip.cli.main()"``; the median
is printed. Commands that exit with status 2 (an argument error) are timed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = (["--help"], ["list", "methods"], ["segment", "--help"], ["compare", "--help"],
            ["attention", "--help"], ["eval", "--help"], ["sweep", "--help"], ["reproduce", "--help"],
            ["demo", "--help"], ["eval"])  # the last: an argument error
RUNNER = "import sys; from resclip.cli import main; sys.exit(main())"


def time_command(args: list[str], repeat: int, env: dict[str, str]) -> tuple[float, int]:
    """(median wall seconds, exit status) of ``resclip ARGS`` over ``repeat`` fresh processes."""
    times, rc = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", RUNNER, *args], env=env, capture_output=True,
                              check=False)
        times.append(time.perf_counter() - start)
        rc = done.returncode
    return statistics.median(times), rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="runs per command (default: 5)")
    ap.add_argument("--src", default=None, help="import resclip from this folder instead")
    args = ap.parse_args()
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.src, env.get("PYTHONPATH")) if p)
    for command in COMMANDS:
        median, rc = time_command(command, args.repeat, env)
        print(f"resclip {' '.join(command):20s} {median:7.3f} s (median of {args.repeat}, exit {rc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
