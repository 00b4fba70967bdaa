"""unet-np gradcheck: every layer's and loss's backward against finite differences and PyTorch.

The cases are the library's (``unet_np.gradcheck.layer_cases``): one for every layer and loss of
unet_np.nn and for the attention gate. PyTorch is imported here, by this command only and only when
it is installed (and --no-torch is not given), as the oracle; the library itself never imports it.
"""
import time

from .common import CLIError, add_common, positive_float, table, warn


def add_parser(sub):
    p = sub.add_parser("gradcheck", help="check every layer's backward (finite differences, PyTorch)",
                       description="For each layer and loss: its hand-written backward against "
                                   "central finite differences, and against PyTorch autograd when "
                                   "torch is importable. float64, tiny shapes.")
    p.add_argument("--layer", help="only the layers whose name contains this (e.g. conv, pool)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--tol-fd", type=positive_float, default=1e-6, help="finite-difference tolerance")
    p.add_argument("--tol-torch", type=positive_float, default=1e-10, help="tolerance against PyTorch")
    add_common(p)
    return p


def import_torch():
    """PyTorch, or None when it is not installed."""
    import importlib
    try:
        return importlib.import_module("torch")
    except ImportError:
        return None


def run(args):
    from ..gradcheck import check_case, layer_cases
    cases = layer_cases()
    if args.layer:
        cases = {k: v for k, v in cases.items() if args.layer.lower() in k.lower()}
        if not cases:
            raise CLIError(f"no layer matches {args.layer!r}; layers: {', '.join(layer_cases())}")
    torch = None if args.no_torch else import_torch()
    rows, failed = [], []
    for name, case in cases.items():
        t0 = time.perf_counter()
        worst_fd, worst_torch = check_case(case, torch=torch)
        ok = worst_fd < args.tol_fd and (worst_torch is None or worst_torch < args.tol_torch)
        if not ok:
            failed.append(name)
        rows.append([name, f"{worst_fd:.1e}", "-" if worst_torch is None else f"{worst_torch:.1e}",
                     "ok" if ok else "FAIL", f"{time.perf_counter() - t0:.2f}"])
    print("float64; finite differences: central, eps 1e-6, max relative error over the input and "
          "every parameter")
    if torch is None:
        print("PyTorch is not used" + (" (--no-torch)" if args.no_torch else
                                       " (not importable here: pip install torch)")
              + ": the torch column is skipped")
    else:
        print(f"PyTorch {torch.__version__}: forward, input and parameter gradients compared")
    print(table(rows, ["layer", "finite diff", "vs torch", "", "seconds"]))
    if failed:
        warn(f"gradcheck failed for: {', '.join(failed)}")
        return 1
    print(f"all {len(rows)} checks passed (tolerances: finite differences {args.tol_fd:g}, "
          f"torch {args.tol_torch:g})")
    return 0
