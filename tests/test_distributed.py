"""Data-parallel training (unet_np.distributed).

In-process checks need no MPI: LocalComm makes DistributedTrainer a one-rank job, which must equal
Trainer bit for bit; SyncBatchNorm's merge of per-rank moments equals the statistics of the union.
The MPI checks launch ``mpiexec -n K python tests/_mpi_train.py`` and skip without mpi4py or
mpiexec: the weights after K = 2 and 3 ranks equal those of one rank (float64, batch-norm on,
class weights, ignored pixels, a final batch smaller than the number of ranks), and a rank that
raises ends the job with a non-zero status and its error text instead of hanging.
"""
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import unet_np
from unet_np.distributed import (DistributedTrainer, GradientBuffer, LocalComm, SyncBatchNorm,
                                 _merge_moments, convert_sync_batchnorm, shard_range)
from unet_np.nn import BatchNorm2d, CrossEntropyLoss
from unet_np.optim import SGD
from unet_np.train import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "_mpi_train.py")
TOL = 1e-13  # relative; the ranks sum in another order: measured worst 4.0e-16 (unet, 2 and 3
             # ranks, after 10 steps; unet++ 2.2e-16), a margin of 250x

HAVE_MPI = importlib.util.find_spec("mpi4py") is not None and shutil.which("mpiexec") is not None
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpiexec (from the checkout: pip install '.[mpi]')")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# -- without MPI -------------------------------------------------------------------------------------
def test_shard_range_covers_every_sample_once():
    for n in range(0, 12):
        for k in range(1, 5):
            parts = [shard_range(n, k, r) for r in range(k)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_merged_moments_equal_the_union():
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((n, 3)) * 5 + 100 for n in (7, 1, 12)]
    rows = [np.concatenate([[len(c)], c.mean(0), ((c - c.mean(0)) ** 2).sum(0)]) for c in chunks]
    M, mean, m2 = _merge_moments(np.array(rows))
    allx = np.concatenate(chunks)
    assert M == len(allx)
    assert rel(mean, allx.mean(0)) < 1e-14
    assert rel(m2 / M, allx.var(0)) < 1e-12


def _tiny(batchnorm=True):
    model = unet_np.UNet(1, 3, depth=2, base_channels=4, batchnorm=batchnorm, dtype="float64")
    rng = np.random.default_rng(1)
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.data.shape) * 0.2
    return model


def _data(n=6):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, 1, 8, 8))
    y = rng.integers(0, 3, size=(n, 8, 8))
    y[:, 0, 0] = -1
    return x, y


def test_one_rank_distributed_trainer_equals_trainer():
    x, y = _data()
    results = []
    for make in (lambda m, o, l: Trainer(m, o, loss=l),
                 lambda m, o, l: DistributedTrainer(m, o, loss=l, comm=LocalComm())):
        model = _tiny()
        loss = CrossEntropyLoss(weight=np.array([1.0, 2.0, 0.5]), ignore_index=-1)
        trainer = make(model, SGD(model.parameters(), lr=0.1, momentum=0.9), loss)
        hist = trainer.fit(x, y, epochs=2, batch_size=4, seed=5)
        results.append((model.state_dict(), [h["loss"] for h in hist]))
    (a, la), (b, lb) = results
    assert la == lb
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_convert_sync_batchnorm_keeps_state_and_behaviour():
    model = _tiny()
    names = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    x, _ = _data(2)
    ref = _tiny().forward(x)
    convert_sync_batchnorm(model, LocalComm())
    assert not any(type(m) is BatchNorm2d for _, m in model.named_modules())
    assert sum(isinstance(m, SyncBatchNorm) for _, m in model.named_modules()) == 10  # 5 blocks x 2
    assert list(model.state_dict()) == names and [id(p) for p in model.parameters()] == params
    np.testing.assert_array_equal(model.forward(x), ref)


def test_gradient_buffer_views():
    model = _tiny(batchnorm=False)
    buf = GradientBuffer(model.parameters(), LocalComm())
    for p in model.parameters():
        assert np.shares_memory(p.grad, buf.buf)
    model.forward(_data(2)[0])
    model.backward(np.ones((2, 3, 8, 8)))
    assert np.abs(buf.buf).sum() > 0
    assert buf.buf.size == sum(p.data.size for p in model.parameters())


def test_missing_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    from unet_np import distributed
    with pytest.raises(ImportError, match=r"pip install mpi4py mpich .*pip install '\.\[mpi\]'"):
        distributed.world()


# -- under mpiexec -----------------------------------------------------------------------------------
def _mpiexec(k, *args, timeout=60):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = ["mpiexec", "-n", str(k), sys.executable, SCRIPT, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _train(k, out, *args):
    p = _mpiexec(k, out, *args)
    assert p.returncode == 0, f"mpiexec -n {k} failed:\n{p.stdout}\n{p.stderr}"
    with np.load(out) as z:
        return {name: z[name] for name in z.files}


@needs_mpi
@pytest.mark.parametrize("arch,ranks", [("unet", (2, 3)), ("unet++", (2,))])
def test_k_ranks_train_like_one(arch, ranks, tmp_path):
    """10 samples, batch 4: batches of 4, 4, 2; with 3 ranks the last batch leaves rank 2 idle."""
    one = _train(1, tmp_path / "one.npz", "--arch", arch)
    for k in ranks:
        many = _train(k, tmp_path / f"k{k}.npz", "--arch", arch)
        assert list(many) == list(one)
        for name in one:
            assert rel(many[name], one[name]) < TOL, (k, name, rel(many[name], one[name]))
        # running statistics moved, so batch-norm really was trained and synchronised
        assert any("running_var" in n and rel(one[n], np.ones_like(one[n])) > 1e-3 for n in one)


@needs_mpi
@pytest.mark.parametrize("fail_rank", [1, 0])
def test_failing_rank_ends_the_job(fail_rank, tmp_path):
    try:
        p = _mpiexec(2, tmp_path / "x.npz", "--fail-rank", fail_rank, "--fail-step", 2, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a failing rank left the job hanging")
    assert p.returncode != 0
    assert f"deliberate failure on rank {fail_rank}" in p.stderr
    assert f"[rank {fail_rank}/2]" in p.stderr
    assert "Traceback" in p.stderr and "RuntimeError" in p.stderr
    assert not os.path.exists(tmp_path / "x.npz")


@needs_mpi
@pytest.mark.parametrize("error,line", [
    ("OSError", "[rank 1/2] error, aborting the MPI job: OSError: deliberate failure on rank 1 at batch 2"),
    ("KeyboardInterrupt", "[rank 1/2] error, aborting the MPI job: interrupted")])
def test_failing_rank_says_an_os_error_or_interrupt_in_one_line(error, line, tmp_path):
    """A full disk or Ctrl-C is not a bug: one line, no traceback; the job still ends."""
    p = _mpiexec(2, tmp_path / "x.npz", "--fail-rank", 1, "--fail-with", error, timeout=60)
    assert p.returncode != 0
    assert line in p.stderr.splitlines(), p.stderr
    assert "Traceback" not in p.stderr
