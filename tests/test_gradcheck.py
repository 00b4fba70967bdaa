"""unet_np.gradcheck: refuses float32 modules, and its case list covers every layer and loss."""
import numpy as np
import pytest

import unet_np.nn as nn
from unet_np.gradcheck import Case, check_case, gradcheck, layer_cases
from unet_np.models.attention_unet import AttentionGate

CASES = layer_cases()

# Finite differences (central, eps 1e-6) on these cases measured at most 2.7e-8 (DiceLoss sigmoid;
# the layers 1e-10 .. 5e-9); 1e-7 leaves a margin of about 4x over the worst.
FD_TOL = 1e-7
# Against PyTorch in float64 the worst measured error was 6.5e-16 (AttentionGate); 1e-13 leaves a
# margin of about 150x and is still far below any real mistake in a backward.
TORCH_TOL = 1e-13


def test_float32_module_is_refused_with_a_clear_message():
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"float64 module: Conv2d holds its parameters in float32.*dtype=np.float64"):
        gradcheck(nn.Conv2d(2, 2, 3, padding=1), x)           # the default dtype is float32


def test_float32_computation_without_parameters_is_refused():
    class Float32ReLU(nn.ReLU):                                # computes in float32 whatever it gets
        def forward(self, x):
            return super().forward(np.asarray(x, dtype=np.float32))
    with pytest.raises(ValueError, match="float64 module"):
        gradcheck(Float32ReLU(), np.random.default_rng(0).standard_normal((1, 1, 3, 3)))


def test_float32_input_is_upcast_exactly():
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    make = CASES["Conv2d 3x3 pad 1"].make
    assert gradcheck(make(), x) == gradcheck(make(), x.astype(np.float64))


def test_a_wrong_backward_is_caught():
    class HalfGradient(nn.Sigmoid):
        def backward(self, dy):
            return 0.5 * super().backward(dy)
    err = gradcheck(HalfGradient(dtype=np.float64), np.random.default_rng(0).standard_normal((1, 1, 3, 3)))
    assert err["input"] > 0.4


def test_cases_cover_every_layer_and_loss():
    """A Module subclass exported by unet_np.nn (or the attention gate) without a case fails here."""
    exported = {v for v in vars(nn).values()
                if isinstance(v, type) and issubclass(v, nn.Module) and v is not nn.Module}
    exported.add(AttentionGate)
    covered = {type(c.make()) for c in CASES.values()}
    missing = sorted(c.__name__ for c in exported - covered)
    assert not missing, f"no gradcheck case in unet_np.gradcheck.layer_cases() for: {missing}"
    for name in ("BCEWithLogitsLoss", "DiceLoss", "CenterCrop", "Pad2d", "AttentionGate"):
        assert any(type(c.make()).__name__ == name for c in CASES.values()), name
    assert any(isinstance(m, nn.Upsample) and m.mode == "nearest" for m in (c.make() for c in CASES.values()))


def test_every_case_is_float64_and_reproducible():
    for c in CASES.values():
        assert isinstance(c, Case)
        assert all(a.dtype == np.float64 for a in c.inputs), c
        a, b = c.make(), c.make()
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert p.data.dtype == np.float64 and np.array_equal(p.data, q.data), (c, n)


@pytest.mark.parametrize("name", list(CASES))
def test_case_passes(name):
    torch = pytest.importorskip("torch")
    fd, tv = check_case(CASES[name], torch=torch)
    assert fd < FD_TOL, (name, fd)
    if CASES[name].torch_fn is not None:
        assert tv is not None and tv < TORCH_TOL, (name, tv)
