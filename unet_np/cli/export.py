"""unet-np export: a trained model as an ONNX file."""
from pathlib import Path

from .common import CLIError, add_common, load_model, positive_int, say


def add_parser(sub):
    p = sub.add_parser("export", help="export a trained model to ONNX",
                       description="Write the model as an ONNX file (opset 17 by default; batch and "
                                   "spatial sizes dynamic) for onnxruntime and other runtimes. Needs "
                                   "the onnx package (pip install onnx, or the [onnx] extra).")
    p.add_argument("--model", required=True, help="a model.npz")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="the graph's float type (default float32, whatever the model's, which is what "
                        "onnxruntime runs; a float64 graph runs only in a reference evaluator such as "
                        "onnx.reference)")
    p.add_argument("--level", type=positive_int, default=None,
                   help="U-Net++ only: export the network pruned to this level")
    add_common(p)
    return p


def run(args):
    from ..onnx_export import export_onnx
    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise CLIError(f"{out}: the ONNX file's name must end in .onnx")
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists: pass --overwrite to replace it")
    model, _ = load_model(args.model)
    if getattr(args, "level", None) is not None:
        if not hasattr(model, "prune"):
            raise CLIError(f"{args.model}: --level applies to U-Net++ models only")
        model.prune(args.level)
    model.eval()
    try:
        path = export_onnx(model, str(out), opset=args.opset, dtype=args.dtype)
    except OSError as e:
        raise CLIError(f"{out}: cannot write it ({e.strerror or e})") from None
    say(f"wrote {path} ({args.dtype})", args.quiet)
    return 0
