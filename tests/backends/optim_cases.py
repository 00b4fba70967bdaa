"""The optimizer settings every fused-update test runs (numba on the CPU, CuPy's optim.cu, numba-cuda's
cuda_optim): (name in unet_np.optim, keyword arguments). No imports, so numba_cuda_check.py, a script,
reads it too. Together they reach every branch of the fused kernels."""
OPTIM_CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01)),    # first step: buf = g
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, betas=(0.3, 0.99))),             # torch's other lerp branch
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
    ("AdamW", dict(lr=0.01, weight_decay=0.05)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
]
OPTIM_IDS = [f"{name}-" + ",".join(f"{k}={v}" for k, v in hp.items()) for name, hp in OPTIM_CASES]
