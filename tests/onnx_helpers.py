"""What the ONNX export tests share: tolerances, the relative error, random weights and statistics,
and an onnxruntime session (each test module importorskips onnx and onnxruntime first)."""
import numpy as np

TOL32 = 1e-4    # relative, ORT's float32 kernels against ours (different summation orders)
TOL64 = 1e-10   # relative, onnx.reference (NumPy) against ours in float64


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"{a.shape} != {b.shape}"
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def randomise(model, seed=0, scale=0.3):
    """Non-trivial weights (normal, std ``scale``) and running statistics (fresh BN statistics
    would be 0 and 1); evaluation mode."""
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = (rng.standard_normal(p.data.shape) * scale).astype(p.data.dtype)
    for _, m in model.named_modules():
        if getattr(m, "running_mean", None) is not None:
            m.running_mean[...] = rng.standard_normal(m.running_mean.shape) * 0.1
            m.running_var[...] = rng.uniform(0.5, 2.0, m.running_var.shape)
    return model.eval()


def session(path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
