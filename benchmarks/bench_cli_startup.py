"""Start-up time of the ``svdquant`` command: ``--help`` of the command and of each subcommand, each in a fresh
process, beside ``python -c "import diffusers_svdquant"`` (what every command paid before the parsers moved to the
light ``svdquant_cli`` package) and a bare interpreter.

The claim under test (issue: a fast CLI) is that help answers in well under a second on a 2-core machine,
because it imports neither torch, diffusers nor transformers (``tests/test_cli.py`` checks the imports; this
script measures the time). Each figure is the median wall time of ``--runs`` fresh processes.

    python benchmarks/bench_cli_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from svdquant_cli import COMMANDS


def _console_script() -> list[str]:
    """The installed ``svdquant`` script, preferring the one beside this interpreter: a version manager's shim
    (pyenv) found first on PATH would add its own start-up to every figure."""
    here = Path(sys.executable).parent / "svdquant"
    found = str(here) if here.is_file() else shutil.which("svdquant")
    return [found] if found else [sys.executable, "-m", "svdquant_cli"]


def _median_seconds(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpu_name() -> str:
    # platform.processor() is often just "x86_64" on Linux; /proc/cpuinfo names the model.
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    """Time each command in fresh processes and print the medians; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="fresh processes per figure (the median is printed)")
    args = p.parse_args(argv)

    script = _console_script()
    print(
        f"{_cpu_name()}; platform.processor() {platform.processor()!r}, {platform.machine()}, "
        f"os.cpu_count() {os.cpu_count()}; Python {platform.python_version()}; median of {args.runs} fresh processes"
    )
    print(f"svdquant = {' '.join(script)}")
    rows = [("python -c pass", [sys.executable, "-c", "pass"])]
    rows += [("svdquant --help", [*script, "--help"])]
    rows += [(f"svdquant {c.name} --help", [*script, c.name, "--help"]) for c in COMMANDS]
    heavy = [
        ('python -c "import diffusers_svdquant"', [sys.executable, "-c", "import diffusers_svdquant"]),
        # The same help through the library package's name (as under accelerate launch): pays the import.
        (
            "python -m diffusers_svdquant.apps.cli --help",
            [sys.executable, "-m", "diffusers_svdquant.apps.cli", "--help"],
        ),
    ]
    figures = {}
    for label, cmd in rows + heavy:
        figures[label] = _median_seconds(cmd, args.runs)
        print(f"  {label:<48} {figures[label] * 1000:8.0f} ms")
    slowest_help = max(v for k, v in figures.items() if k.startswith("svdquant"))
    library = figures['python -c "import diffusers_svdquant"']
    print(
        f"slowest svdquant help {slowest_help * 1000:.0f} ms; import diffusers_svdquant {library * 1000:.0f} ms "
        f"({library / slowest_help:.0f}x the slowest help)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
