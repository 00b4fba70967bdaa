"""Under load and over time: no memory growth, bounded caches, thread-safe prediction, determinism."""
import gc
import threading
import tracemalloc

import numpy as np
import pytest

import unet_np
from unet_np import UNet
from unet_np.nn import CrossEntropyLoss
from unet_np.optim import SGD


def _step(model, opt, loss, x, y):
    opt.zero_grad()
    loss.forward(model.forward(x), y)
    model.backward(loss.backward())
    opt.step()


def test_no_memory_growth_over_1000_training_steps():
    unet_np.seed(0)
    model = UNet(1, 2, depth=1, base_channels=2)
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = CrossEntropyLoss()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 2, (2, 8, 8))
    for _ in range(50):
        _step(model, opt, loss, x, y)
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(100):
            _step(model, opt, loss, x, y)
        gc.collect()
        after_100 = tracemalloc.get_traced_memory()[0]
        for _ in range(900):
            _step(model, opt, loss, x, y)
        gc.collect()
        after_1000 = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # Whatever a step keeps (activations of the last forward) is the same at step 100 and 1000.
    assert after_1000 - after_100 < 64 * 1024, (after_100, after_1000)


def test_changing_input_shapes_do_not_grow_memory():
    unet_np.seed(0)
    model = UNet(1, 2, depth=2, base_channels=2)
    sizes = [(8, 8), (12, 16), (16, 8), (20, 20), (24, 12), (32, 32)]
    rng = np.random.default_rng(1)
    model.predict(np.zeros((1, 1, 8, 8), np.float32))
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for rep in range(5):
            for h, w in sizes:
                model.forward(rng.standard_normal((1, 1, h, w)).astype(np.float32))
                model.predict(rng.standard_normal((2, 1, h, w)).astype(np.float32))
            gc.collect()
            if rep == 0:
                first = tracemalloc.get_traced_memory()[0]
        last = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert first - base < 4 * 2 ** 20
    assert last - first < 64 * 1024, (base, first, last)


def test_predict_from_several_threads_equals_serial():
    unet_np.seed(0)
    model = UNet(1, 3, depth=2, base_channels=4, batchnorm=True).eval()
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal((1, 1, 16 + 8 * (i % 3), 16)).astype(np.float32) for i in range(12)]
    serial = [model.predict(x) for x in inputs]
    results = [None] * len(inputs)
    errors = []

    def work(i):
        try:
            for _ in range(3):
                results[i] = model.predict(inputs[i])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for a, b in zip(serial, results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_same_seed_gives_bit_identical_weights(backend):
    if backend not in unet_np.backends.available():
        pytest.skip(f"backend {backend!r} is not available here")

    def run():
        unet_np.seed(3)
        model = UNet(1, 2, depth=2, base_channels=4, batchnorm=True, backend=backend)
        opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
        loss = CrossEntropyLoss()
        rng = np.random.default_rng(4)
        for _ in range(5):
            x = rng.standard_normal((2, 1, 16, 16)).astype(np.float32)
            y = rng.integers(0, 2, (2, 16, 16))
            _step(model, opt, loss, x, y)
        return model.state_dict()

    a, b = run(), run()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batchnorm_on_a_constant_channel_gives_no_nan():
    model = UNet(1, 2, depth=1, base_channels=2, batchnorm=True)
    y = model.forward(np.full((2, 1, 8, 8), 3.0, np.float32))
    dx = model.backward(np.ones_like(y))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    assert all(np.all(np.isfinite(p.grad)) for p in model.parameters())


def test_optimizer_without_parameters_is_a_clear_error():
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)


def test_to_moves_optimizer_state_and_training_continues_identically():
    """model.to(backend, optimizer) keeps the momentum buffers: a run that moves numpy -> numpy
    mid-way (the state goes through its NumPy form) equals one that never moved."""
    def run(move):
        unet_np.seed(0)
        model = UNet(1, 2, depth=1, base_channels=2, dtype=np.float64)
        opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss = CrossEntropyLoss()
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 1, 8, 8))
        y = rng.integers(0, 2, (2, 8, 8))
        for i in range(4):
            if move and i == 2:
                before = opt.state_dict()
                model.to("numpy", optimizer=opt)
                after = opt.state_dict()
                assert before.keys() == after.keys()
                for k in before:
                    np.testing.assert_array_equal(np.asarray(before[k]), np.asarray(after[k]))
            _step(model, opt, loss, x, y)
        return model.state_dict()

    a, b = run(False), run(True)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
