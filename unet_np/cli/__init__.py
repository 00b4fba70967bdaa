"""The ``unet-np`` command: demo, train, predict, evaluate, gradcheck, export, bench.

    unet-np demo                                   # synthetic cells: train, evaluate, plot
    unet-np train --images imgs/ --masks masks/ --out run/
    unet-np predict --model run/model.npz --input new_imgs/ --out pred/
    unet-np evaluate --model run/model.npz --images test_imgs/ --masks test_masks/ --json
    unet-np gradcheck                              # every layer's backward, checked
    unet-np export --model run/model.npz --out model.onnx
    unet-np bench --quick                          # the CPU benchmark (source checkout only)

One module per command (its options in ``add_parser``, its work in ``run``), each over the public
API of the library; common.py holds what they share. Every sub-command has --help. A problem with
the input (missing folder, image without mask, corrupt file, unknown mask values, unwritable output,
existing model) ends the command with one line on stderr naming the problem and exit status 2;
--debug shows the traceback instead.

NumPy only: Pillow (reading images), matplotlib (plots) and tqdm (progress bars) are the optional
[viz] extra, imported when needed. Without matplotlib the command still trains and says which plots
it skipped.
"""
import argparse
import sys
from pathlib import Path

from . import bench, demo, evaluate, export, gradcheck, predict, train
from .common import PROG, CLIError, one_line, warn

__all__ = ["main", "build_parser", "CLIError"]

COMMANDS = {"demo": demo, "train": train, "predict": predict, "evaluate": evaluate,
            "gradcheck": gradcheck, "export": export, "bench": bench}


def build_parser():
    from .. import __version__
    parser = argparse.ArgumentParser(
        prog=PROG, description="U-Net segmentation on NumPy: every forward and backward pass by hand.",
        epilog="Start with: unet-np demo. Each command has --help.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "bench":
            return bench.run(args, rest)
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        return interrupted(args)
    except Exception as e:  # noqa: BLE001 - the one place every error becomes one line
        if interrupted_inside(e):
            return interrupted(args)
        if getattr(args, "debug", False):
            raise
        warn(f"{args.command}: error: {one_line(e)}")
        return 2


def interrupted_inside(e):
    """True when ``e`` is Ctrl-C seen through compiled code: a SIGINT that arrives while a Numba
    kernel runs surfaces as SystemError('... returned a result with an exception set') whose cause
    is the KeyboardInterrupt."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def interrupted(args):
    """Ctrl-C: one line, and for train the command that continues from the last checkpoint."""
    last = Path(args.out) / "last.npz" if args.command == "train" else None
    warn("interrupted" + (f"; to continue: unet-np train ... --out {args.out} --resume {last}"
                          if last is not None and last.exists() else ""))
    return 130
