"""unet-np bench: runs the CPU benchmark of a source checkout (python -m benchmarks.cpu)."""
import subprocess
import sys
from pathlib import Path

from .common import CLIError, add_common, say


def add_parser(sub):
    p = sub.add_parser("bench", help="run the CPU benchmark (python -m benchmarks.cpu)",
                       description="Runs python -m benchmarks.cpu from the source checkout; every "
                                   "other argument is passed on (e.g. --quick, --threads 2). "
                                   "See the benchmark's own options with: unet-np bench --bench-help")
    p.add_argument("--bench-help", action="store_true", help="show the benchmark's options")
    add_common(p)
    return p


def run(args, rest):
    root = Path(__file__).resolve().parent.parent.parent
    if not (root / "benchmarks" / "cpu.py").is_file():
        raise CLIError(f"the CPU benchmark is not here: {root / 'benchmarks'} does not exist. It ships "
                       f"with the source checkout, not with the installed package: clone the "
                       f"repository and run unet-np bench (or python -m benchmarks.cpu) there")
    cmd = [sys.executable, "-m", "benchmarks.cpu", *rest, *(["--help"] if args.bench_help else [])]
    say("running: " + " ".join(cmd) + f"  (in {root})")
    return subprocess.call(cmd, cwd=str(root))
