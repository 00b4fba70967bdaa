"""What docs/backprop.md says about the code, checked: each test fails if the code stops doing what
the document says (or the document's worked example stops being true).

Float64 throughout; comparisons with PyTorch and with the document's formulas written out literally
in NumPy here are held to 1e-12 relative (measured: at most about 4e-16)."""
import importlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from unet_np.nn import Conv2d, ConvTranspose2d, DiceLoss
from unet_np.nn import conv as conv_module
from tests.doc_blocks import python_blocks, run_blocks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-12


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# -- transposed convolution: which output_padding rows get only the bias -----------------------------
def _doc_example(padding):
    m = ConvTranspose2d(1, 1, 3, stride=2, padding=padding, output_padding=1, dtype=np.float64)
    m.weight.data[...] = np.arange(1, 10, dtype=np.float64).reshape(1, 1, 3, 3)
    m.bias.data[...] = 0.5
    x = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    return m, x


def test_transposed_conv_worked_example_with_padding():
    """k=3, s=2, p=1, op=1: the last row is (24.5, 55.5, 32.5, 36.5), not the bias alone."""
    m, x = _doc_example(padding=1)
    y = m.forward(x)
    assert y.shape == (1, 1, 4, 4)
    np.testing.assert_array_equal(y[0, 0, -1], [24.5, 55.5, 32.5, 36.5])
    # by the document's recipe: the full output has F = (H-1)s + d(k-1) + 1 = 5 rows; the layer
    # keeps rows p_t .. p_t + H' - 1 of it, so its last row is full row 4
    full = np.zeros((5, 5))
    for r in range(2):
        for c in range(2):
            full[2 * r:2 * r + 3, 2 * c:2 * c + 3] += x[0, 0, r, c] * m.weight.data[0, 0]
    np.testing.assert_array_equal(y[0, 0], full[1:5, 1:5] + 0.5)
    torch = pytest.importorskip("torch")
    ty = torch.nn.functional.conv_transpose2d(torch.tensor(x), torch.tensor(m.weight.data),
                                              torch.tensor(m.bias.data), stride=2, padding=1,
                                              output_padding=1)
    np.testing.assert_array_equal(ty.numpy()[0, 0, -1], [24.5, 55.5, 32.5, 36.5])


def test_transposed_conv_worked_example_without_padding():
    m, x = _doc_example(padding=0)
    y = m.forward(x)
    assert y.shape == (1, 1, 6, 6)
    np.testing.assert_array_equal(y[0, 0, -1], 0.5)       # row F = 5: under no window
    np.testing.assert_array_equal(y[0, 0, :, -1], 0.5)    # and column 5
    assert np.all(y[0, 0, :-1, :-1] != 0.5)


@pytest.mark.parametrize("k,s,p,op,d", [(3, 2, 1, 1, 1), (3, 2, 0, 1, 1), (4, 3, 1, 2, 1),
                                        (3, 3, 0, 2, 1), (2, 3, 1, 2, 1), (3, 2, 0, 1, 2),
                                        (3, 1, 1, 1, 2), (2, 2, 1, 1, 1)])
def test_rows_under_no_window_get_only_the_bias(k, s, p, op, d):
    """Row r of the output is row r + p of the full output, reached when r + p = u s + i d; with
    d = 1 and s <= k (no gaps between the taps) exactly the max(0, op - p) rows past F are not."""
    H = 3
    m = ConvTranspose2d(2, 3, k, stride=s, padding=p, output_padding=op, dilation=d, dtype=np.float64)
    m.bias.data[...] = 0.0
    y = m.forward(np.random.default_rng(0).uniform(1, 2, (1, 2, H, H)))
    reached = {u * s + i * d for u in range(H) for i in range(k)}
    bias_only = [bool(np.all(y[0, :, r, :] == 0)) for r in range(y.shape[2])]
    assert bias_only == [r + p not in reached for r in range(y.shape[2])]
    if d == 1 and s <= k:
        n = max(0, op - p)
        assert bias_only == [False] * (y.shape[2] - n) + [True] * n


# -- the input gradient of a convolution, by the document's recipe --------------------------------
def _input_grad_by_the_recipe(g, w, H, W, s, p, d):
    """Spread g out (s-1 zeros between neighbours), add the r trailing zeros the floor dropped,
    border of d(k-1) zeros, correlate with the flipped, channel-swapped kernel, crop the padding."""
    N, O, Ho, Wo = g.shape
    _, C, kh, kw = w.shape
    sizes = []
    for n, k in ((H, kh), (W, kw)):
        r = (n + 2 * p - d * (k - 1) - 1) % s
        sizes.append(((Ho if n == H else Wo) - 1) * s + 1 + r)
    spread = np.zeros((N, O, sizes[0], sizes[1]))
    spread[:, :, :(Ho - 1) * s + 1:s, :(Wo - 1) * s + 1:s] = g
    fh, fw = d * (kh - 1), d * (kw - 1)
    ghat = np.pad(spread, ((0, 0), (0, 0), (fh, fh), (fw, fw)))
    wflat = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)          # w_flat[c, o, i', j']
    Hp, Wp = H + 2 * p, W + 2 * p
    assert ghat.shape[2] - fh == Hp and ghat.shape[3] - fw == Wp   # exactly the padded size
    dxp = np.zeros((N, C, Hp, Wp))
    for i in range(kh):
        for j in range(kw):
            window = ghat[:, :, i * d:i * d + Hp, j * d:j * d + Wp]     # (N, O, Hp, Wp)
            dxp += np.einsum("co,nohw->nchw", wflat[:, :, i, j], window)
    return dxp[:, :, p:p + H, p:p + W]


@pytest.mark.parametrize("H,W,k,s,p,d", [(8, 8, 3, 2, 0, 1), (7, 6, 3, 2, 1, 1), (8, 9, 3, 2, 1, 1),
                                          (9, 7, 3, 3, 1, 1), (9, 10, 3, 2, 2, 2), (6, 7, 3, 1, 1, 1),
                                          (7, 7, 2, 3, 0, 1)])
def test_input_gradient_is_the_full_correlation_with_trailing_zeros(H, W, k, s, p, d):
    rng = np.random.default_rng(1)
    m = Conv2d(3, 4, k, stride=s, padding=p, dilation=d, dtype=np.float64)
    x = rng.standard_normal((2, 3, H, W))
    y = m.forward(x)
    g = rng.standard_normal(y.shape)
    dx = m.backward(g)
    ours = _input_grad_by_the_recipe(g, m.weight.data, H, W, s, p, d)
    assert _rel(dx, ours) < TOL
    torch = pytest.importorskip("torch")
    tx = torch.tensor(x, requires_grad=True)
    torch.nn.functional.conv2d(tx, torch.tensor(m.weight.data), torch.tensor(m.bias.data), stride=s,
                               padding=p, dilation=d).backward(torch.tensor(g))
    assert _rel(ours, tx.grad.numpy()) < TOL


def test_the_documents_strided_example_drops_the_last_row():
    """H = 8, k = 3, s = 2, no padding: H_o = 3, r = 1, and the last input row gets zero gradient."""
    m = Conv2d(1, 1, 3, stride=2, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8))
    assert m.forward(x).shape[2] == 3
    dx = m.backward(np.ones((1, 1, 3, 3)))
    assert np.all(dx[0, 0, 7, :] == 0) and np.all(dx[0, 0, :, 7] == 0)
    assert np.all(dx[0, 0, 6, :7] != 0)


# -- what the code builds: w_flat on the default path's gather, never in the reference ----------------
def _record_weights(monkeypatch):
    """Wrap the drivers the default conv2d_backward hands a weight to; return the list they fill."""
    fast = importlib.import_module(conv_module.make_conv_primitives.__module__)
    seen = []
    for name in ("_conv_tiles", "_winograd_conv"):
        original = getattr(fast, name)

        def wrapper(*args, _original=original, **kw):
            seen.append(np.array(args[1]))
            return _original(*args, **kw)
        monkeypatch.setattr(fast, name, wrapper)
    return seen


def _flipped(w):
    return np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


def test_default_backward_builds_the_flipped_kernel_at_stride_1(monkeypatch):
    seen = _record_weights(monkeypatch)
    prims = conv_module.make_conv_primitives()
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 4, 9, 9)), rng.standard_normal((4, 4, 3, 3)), rng.standard_normal(4)
    y, cache = prims["conv2d_forward"](x, w, b, 1, 1, 1)       # C = O = 4: 4C >= O, pad 1 <= 2
    del seen[:]
    dx, dw, db = prims["conv2d_backward"](np.ones_like(y), cache)
    wf = _flipped(w)
    assert any(a.size == wf.size and np.array_equal(a.reshape(wf.shape), wf) for a in seen), \
        "the tiled input gradient no longer correlates dy with w flipped and transposed"
    ref_dx, _, _ = conv_module.conv2d_backward_reference(np.ones_like(y),
                                                         conv_module.conv2d_forward_reference(x, w, b, 1, 1, 1)[1])
    assert _rel(dx, ref_dx) < TOL


@pytest.mark.parametrize("stride,cin,cout", [(2, 4, 4), (1, 1, 8)])
def test_default_backward_uses_col2im_otherwise(monkeypatch, stride, cin, cout):
    """A stride, or 4C < O: no flipped kernel, M^T dy and col2im instead."""
    seen = _record_weights(monkeypatch)
    prims = conv_module.make_conv_primitives()
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, cin, 9, 9)), rng.standard_normal((cout, cin, 3, 3))
    y, cache = prims["conv2d_forward"](x, w, None, stride, 1, 1)
    del seen[:]
    prims["conv2d_backward"](np.ones_like(y), cache)
    assert not seen


def test_reference_backward_never_builds_the_flipped_kernel(monkeypatch):
    seen = _record_weights(monkeypatch)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 4, 9, 9)), rng.standard_normal((4, 4, 3, 3))
    y, cache = conv_module.conv2d_forward_reference(x, w, None, 1, 1, 1)
    conv_module.conv2d_backward_reference(np.ones_like(y), cache)
    assert not seen


class _CountingNumpy:
    """numpy, with np.zeros calls counted by shape."""

    def __init__(self):
        self.zeros_shapes = []

    def zeros(self, shape, *a, **kw):
        self.zeros_shapes.append(tuple(shape) if isinstance(shape, (tuple, list)) else (shape,))
        return np.zeros(shape, *a, **kw)

    def __getattr__(self, name):
        return getattr(np, name)


@pytest.mark.parametrize("stride,zeroed", [(1, False), (2, True)])
def test_col2im_skips_the_zeroing_pass_when_an_offset_covers_every_pixel(monkeypatch, stride, zeroed):
    ref = importlib.import_module(conv_module.conv2d_backward_reference.__module__)
    counting = _CountingNumpy()
    monkeypatch.setattr(ref, "np", counting)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 2, 6, 6)), rng.standard_normal((3, 2, 3, 3))
    y, cache = ref.conv2d_forward_reference(x, w, None, stride, 1, 1)
    dx, _, _ = ref.conv2d_backward_reference(np.ones_like(y), cache)
    assert (x.shape in counting.zeros_shapes) == zeroed, counting.zeros_shapes


# -- soft Dice: g_ic = beta_c + alpha_c y_ic, beta_c = a_c D_c, alpha_c = -2 a_c ------------------------
@pytest.mark.parametrize("smooth,eps,include_background", [(1.0, 1e-7, True), (1.0, 1e-7, False),
                                                          (0.0, 1e3, True)])
def test_dice_gradient_from_beta_and_alpha(smooth, eps, include_background):
    """The document's formulas, written out: with eps = 1e3 the floor binds and beta_c is 0."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5))
    t = rng.integers(0, 3, (2, 4, 5))
    loss = DiceLoss(smooth=smooth, eps=eps, include_background=include_background)
    loss.forward(x, t)
    dx = loss.backward()
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.eye(3)[t].transpose(0, 3, 1, 2)
    inter, psum, tsum = (p * y).sum((0, 2, 3)), p.sum((0, 2, 3)), y.sum((0, 2, 3))
    den = psum + tsum + smooth
    floor = den < eps
    D = (2 * inter + smooth) / np.maximum(den, eps)
    K = np.array([1.0, 1.0, 1.0]) if include_background else np.array([0.0, 1.0, 1.0])
    a = K / (K.sum() * np.maximum(den, eps))
    beta = np.where(floor, 0.0, a * D)
    alpha = -2 * a
    assert floor.all() == (eps == 1e3)
    g = beta[None, :, None, None] + alpha[None, :, None, None] * y
    expected = p * (g - (p * g).sum(1, keepdims=True))
    assert _rel(dx, expected) < TOL


# -- where torch is imported ----------------------------------------------------------------------------
def test_only_the_command_imports_torch():
    """'Nothing else in unet_np imports torch': a source scan, so a new import elsewhere fails."""
    pattern = re.compile(r"^\s*(import torch|from torch\b)|import_module\(\s*['\"]torch['\"]", re.M)
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, "unet_np")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                if pattern.search(open(path, encoding="utf-8").read()):
                    found.append(os.path.relpath(path, ROOT).replace(os.sep, "/"))
    assert all(f == "unet_np/cli.py" or f.startswith("unet_np/cli/") for f in found), found


def test_gradcheck_without_torch_never_imports_it():
    code = ("import sys\n"
            "from unet_np.gradcheck import layer_cases, check_case\n"
            "from unet_np.cli import main\n"
            "check_case(layer_cases()['ReLU'])\n"
            "assert main(['gradcheck', '--layer', 'sigmoid', '--no-torch']) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


# -- docs/writing-a-layer.md: every ```python block runs, in order ---------------------------------------
LAYER_DOC = "docs/writing-a-layer.md"


def test_writing_a_layer_has_code_to_run():
    assert len(python_blocks(LAYER_DOC)) >= 6


def test_writing_a_layer_every_python_block_runs():
    ns = run_blocks(LAYER_DOC)
    assert "ChannelScale" in ns and ns["errors"]


def test_doc_blocks_reports_a_failing_block(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("text\n\n```python\nx = 1\n```\n\n```\nnot run\n```\n\n```python\nassert x == 2\n```\n")
    assert [line for line, _ in python_blocks(str(doc))] == [4, 12]
    with pytest.raises(AssertionError, match=r"line 12 raised AssertionError"):
        run_blocks(str(doc))


def test_doc_blocks_refuses_an_unclosed_fence(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("```python\nx = 1\n")
    with pytest.raises(ValueError, match="never closed"):
        python_blocks(str(doc))
