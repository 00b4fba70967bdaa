"""Data-parallel training over MPI (mpi4py): K processes, one model replica each, one global batch.

    mpiexec -n 2 python train.py            # train.py builds a DistributedTrainer instead of a Trainer

    from unet_np.distributed import DistributedTrainer
    trainer = DistributedTrainer(model, optimizer, loss=CrossEntropyLoss())   # comm: MPI.COMM_WORLD
    trainer.fit(images, masks, epochs=10, batch_size=8, out_dir="out", seed=0)

What makes K ranks train exactly as one process does (same seed, same data, same hyper-parameters):

* Same batches. Every rank runs Trainer.fit's loop with the same seed, so every rank draws the same
  permutation and (with augmentation) the same random transforms of the same GLOBAL batch; then
  ``train_step`` keeps only its own contiguous share of it: rank r takes samples
  [r*B//K + min(r, B%K) ...) -- the first B%K ranks one more. A batch smaller than K leaves the last
  ranks idle for that step (they still take part in the gradient sum, with zeros).
* Same weights at the start: rank 0's parameters and buffers are broadcast when the trainer is built.
* Same loss. The loss is a mean over the global batch. Cross-entropy is sum_i pw_i w_i l_i / sum_i w_i
  over every pixel of the global batch, so each rank computes its local mean, and its gradient is
  scaled by local_den / global_den (den = sum of the class weights of its non-ignored pixels: its
  pixel count without class weights). The loss reported is the global mean. BCE uses the element
  count; any other loss (Dice) is weighted by the sample count, an approximation (Dice is not a mean
  over samples), and a warning says so.
* Same gradient. All gradients live in one contiguous buffer (each ``p.grad`` is a view of it), summed
  by ONE ``Allreduce(MPI.IN_PLACE, buf, op=SUM)`` per step; after the scaling above the sum IS the
  global-mean gradient (the "divide by K" of equal shares is folded into the scale). Every rank then
  applies the same optimizer step to the same weights, so the replicas stay identical.
* Same batch-norm. ``convert_sync_batchnorm`` swaps every BatchNorm2d for a SyncBatchNorm: in training
  the per-channel statistics are those of the whole global batch (each rank's count, mean and sum of
  squared deviations gathered with one Allgather and merged with Chan's formula: no cancellation as
  in sum(x^2) - M mu^2), and its backward reduces the two per-channel sums (sum dy, sum dy*xhat) with
  one Allreduce. The result does not depend on K (up to the order of floating-point sums).

Only rank 0 writes checkpoints, runs validation, reports progress and calls the callbacks. An
exception on any rank prints that rank's traceback and calls ``comm.Abort`` (the job ends with a
non-zero status instead of the other ranks hanging in a collective).

mpi4py is imported lazily; it comes with the ``[mpi]`` extra (``pip install '.[mpi]'`` in a
checkout, or ``pip install mpi4py mpich``: mpi4py and the MPICH wheel with its ``mpiexec``).
"""
import contextlib
import math
import os
import sys
import time
import traceback
import warnings

import numpy as np

from .backends import to_numpy
from .nn.loss import BCEWithLogitsLoss, CrossEntropyLoss
from .nn.module import check_input
from .nn.norm import BatchNorm2d, channel_dot, channel_sum, per_channel
from .train import Trainer, TrainingError

__all__ = ["DistributedTrainer", "SyncBatchNorm", "convert_sync_batchnorm", "GradientBuffer",
           "broadcast_model", "shard_range", "abort_on_error", "world", "launched_by_mpi",
           "is_root", "LocalComm"]

ABORT_GRACE_S = 0.5   # seconds between an aborting rank's error text and its MPI_Abort

# Environment variables that MPI launchers set for every rank (MPICH/Hydra, Open MPI, PMIx, Slurm).
_LAUNCHER_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def _mpi():
    """mpi4py.MPI, or an ImportError naming the extra that brings it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError("distributed training needs mpi4py and an MPI library: "
                          "pip install mpi4py mpich (the mpich wheel provides mpiexec; they are "
                          "the unet-np[mpi] extra, in a checkout: pip install '.[mpi]') "
                          f"({exc})") from None
    return MPI


def launched_by_mpi():
    """True when this process was started by mpiexec/mpirun/srun with an MPI environment."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def world():
    """MPI.COMM_WORLD (imports mpi4py)."""
    return _mpi().COMM_WORLD


def is_root(comm=None):
    """True on rank 0 (and in a process that is not part of an MPI job)."""
    if comm is None:
        if not launched_by_mpi():
            return True
        comm = world()
    return comm.Get_rank() == 0


class LocalComm:
    """A communicator of one process with mpi4py's method names: DistributedTrainer(comm=LocalComm())
    runs exactly like Trainer, without MPI installed (every collective is the identity)."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    rank = property(Get_rank)
    size = property(Get_size)

    def bcast(self, obj, root=0):
        return obj

    def Allreduce(self, sendbuf, recvbuf, op=None):
        if not _is_in_place(sendbuf):
            recvbuf[...] = sendbuf

    def Allgather(self, sendbuf, recvbuf):
        recvbuf.reshape(-1)[...] = np.asarray(sendbuf).reshape(-1)

    def Barrier(self):
        pass

    def Abort(self, errorcode=1):
        sys.stderr.flush()
        os._exit(errorcode)


def _is_in_place(buf):
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and buf is mpi.IN_PLACE


def _allreduce_sum(comm, buf):
    """In-place sum of the NumPy array ``buf`` over comm."""
    if comm.Get_size() == 1:
        return buf
    comm.Allreduce(_mpi().IN_PLACE, buf, op=_mpi().SUM)
    return buf


@contextlib.contextmanager
def abort_on_error(comm=None):
    """Inside this block an exception prints '[rank r/K] error, aborting the MPI job:' and what went
    wrong to stderr and, in a job of more than one rank, calls comm.Abort(1): the other ranks would
    otherwise wait forever in their next collective. What went wrong is one line for an interrupt
    (Ctrl-C) or an OSError (a full disk, a folder that cannot be written: the message names the
    file), the traceback for anything else. Abort is reached even if printing fails. In a one-rank
    job the exception propagates as usual."""
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        if comm is None:
            comm = world() if launched_by_mpi() else LocalComm()
        rank, size = comm.Get_rank(), comm.Get_size()
        if size > 1:
            try:
                if isinstance(exc, KeyboardInterrupt):
                    text = "interrupted\n"
                elif isinstance(exc, OSError):
                    text = f"{type(exc).__name__}: {exc}\n"
                else:
                    text = "\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                sys.stdout.flush()
                sys.stderr.write(f"[rank {rank}/{size}] error, aborting the MPI job: {text}")
                sys.stderr.flush()
                # The launcher forwards a rank's stderr and handles its abort request on separate
                # channels: an abort that arrives first can kill the job with the text still
                # unsent (seen once in CI: mpiexec returned 1 with empty stderr). A pause lets it out.
                time.sleep(ABORT_GRACE_S)
            finally:                    # a broken pipe or a second Ctrl-C above must not stop this
                comm.Abort(1)
                os._exit(1)  # MPI_Abort should not return; make sure this rank ends either way
        raise


def shard_range(n, size, rank):
    """(start, stop) of rank's contiguous share of n items split over size ranks (the first n % size
    ranks get one more; ranks beyond n get an empty share)."""
    base, extra = divmod(int(n), int(size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# -- synchronised batch normalisation ------------------------------------------------------------
def _merge_moments(parts):
    """parts (K, 1 + 2C) float64 rows [count, mean_c, M2_c] -> (count, mean (C,), M2 (C,)) of the union,
    merged in rank order (Chan, Golub, LeVeque): M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2."""
    C = (parts.shape[1] - 1) // 2
    counts = parts[:, 0]
    total = counts.sum()
    means = parts[:, 1:1 + C]
    mean = (counts[:, None] * means).sum(axis=0) / total
    m2 = parts[:, 1 + C:].sum(axis=0) + (counts[:, None] * (means - mean) ** 2).sum(axis=0)
    return total, mean, m2


class SyncBatchNorm(BatchNorm2d):
    """BatchNorm2d whose training statistics span every rank of ``comm`` (None: this process only).

    Forward (training), M = the global count per channel, sigma = sqrt(v + eps):
        each rank: n_r, mean_r, M2_r = sum (x - mean_r)^2 over its (N_r, H, W)      -- Allgather
        mean = sum n_r mean_r / M,  v = (sum M2_r + sum n_r (mean_r - mean)^2) / M  (biased)
        y = gamma (x - mean) / sigma + beta
    Backward: with the GLOBAL sums Sdy = sum dy and Sdx = sum dy * xhat                -- Allreduce
        dx = gamma / sigma * (dy - Sdy / M - xhat * Sdx / M)
    and the LOCAL sums go into weight.grad / bias.grad (the gradient Allreduce adds the ranks up).
    Running statistics are updated from the global mean and unbiased variance (M / (M - 1)), so every
    rank keeps the same ones. Evaluation: the running statistics, no communication (rank 0 may
    validate alone). The statistics travel as float64 whatever the layer's dtype.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 comm=None, dtype=None, backend="numpy"):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, dtype=dtype, backend=backend)
        self.comm = comm

    @classmethod
    def from_batchnorm(cls, bn, comm=None):
        """A SyncBatchNorm sharing bn's parameters and buffers (the same arrays, not copies)."""
        new = cls.__new__(cls)
        for k, v in bn.__dict__.items():
            object.__setattr__(new, k, v)
        new.comm = comm
        return new

    def _synced(self):
        return self.training and self.comm is not None and self.comm.Get_size() > 1

    def forward(self, x):
        if not self._synced():
            return super().forward(x)
        x = check_input("SyncBatchNorm", x, channels=self.num_features, xp=self.xp, dtype=self.dtype)
        C = self.num_features
        m_local = x.size // C
        mu_l = channel_sum(x) / m_local
        xc = x - per_channel(mu_l)
        m2_l = channel_sum(self.xp.square(xc))
        send = np.concatenate([[float(m_local)], to_numpy(mu_l).astype(np.float64),
                               to_numpy(m2_l).astype(np.float64)])
        parts = np.empty((self.comm.Get_size(), send.size), dtype=np.float64)
        self.comm.Allgather(send, parts)
        parts = parts[parts[:, 0] > 0]
        M, mean, m2 = _merge_moments(parts)
        M = int(round(M))
        if M < 2:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel when training, "
                             f"got {M} over all ranks (local input shape {tuple(x.shape)})")
        var = m2 / M
        inv_std = 1.0 / np.sqrt(var + self.eps)
        mean_x = self.backend.asarray(mean.astype(self.dtype))
        inv_x = self.backend.asarray(inv_std.astype(self.dtype))
        xhat = x - per_channel(mean_x)
        xhat *= per_channel(inv_x)
        gamma = self.weight.data if self.affine else None
        y = xhat * per_channel(gamma) if gamma is not None else xhat.copy()
        if self.affine:
            y += per_channel(self.bias.data)
        if self.track_running_stats:
            self.num_batches_tracked += 1
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean *= 1 - factor
            self.running_mean += self.backend.asarray((factor * mean).astype(self.dtype))
            self.running_var *= 1 - factor
            self.running_var += self.backend.asarray((factor * M / (M - 1) * var).astype(self.dtype))
        self._keep(("sync", xhat, gamma, inv_x, M))
        return y

    def backward(self, dy):
        cache = self._take()
        if cache[0] != "sync":
            return super().backward(dy)
        _, xhat, gamma, inv_std, M = cache
        dy = self.xp.asarray(dy)
        if tuple(dy.shape) != tuple(xhat.shape):
            raise ValueError(f"SyncBatchNorm: backward expected dy of shape {tuple(xhat.shape)}, got "
                             f"{tuple(dy.shape)}")
        C = self.num_features
        dbeta_l = channel_sum(dy)
        dgamma_l = channel_dot(dy, xhat)
        sums = np.concatenate([to_numpy(dbeta_l), to_numpy(dgamma_l)]).astype(np.float64)
        _allreduce_sum(self.comm, sums)
        dbeta_g = self.backend.asarray(sums[:C].astype(self.dtype))
        dgamma_g = self.backend.asarray(sums[C:].astype(self.dtype))
        dx = xhat * per_channel(dgamma_g / M)
        self.xp.subtract(dy, dx, out=dx)
        dx -= per_channel(dbeta_g / M)
        dx *= per_channel(inv_std if gamma is None else gamma * inv_std)
        if self.affine:
            self.weight.add_grad(dgamma_l)
            self.bias.add_grad(dbeta_l)
        self._release()
        return dx


def convert_sync_batchnorm(model, comm=None):
    """Replace every BatchNorm2d in ``model`` (in place) by a SyncBatchNorm over ``comm`` that shares
    its parameters and running statistics; state_dict names and order are unchanged. Returns the
    model. ``comm=None``: MPI.COMM_WORLD."""
    if comm is None:
        comm = world()
    for _, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, SyncBatchNorm):
                child.comm = comm
            elif type(child) is BatchNorm2d:
                setattr(parent, name, SyncBatchNorm.from_batchnorm(child, comm))
    return model


def sync_batchnorm_layers(model):
    return [m for _, m in model.named_modules() if isinstance(m, SyncBatchNorm)]


# -- gradients and weights ----------------------------------------------------------------------------
class GradientBuffer:
    """One contiguous buffer holding every parameter's gradient: ``p.grad`` becomes a view of its slice,
    so the layers accumulate straight into it and one Allreduce sums them all."""

    def __init__(self, params, comm):
        self.params = list(params)
        self.comm = comm
        dtypes = {np.dtype(p.grad.dtype) for p in self.params}
        if len(dtypes) != 1:
            raise TypeError(f"GradientBuffer: the parameters mix dtypes {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        self.host = all(isinstance(p.grad, np.ndarray) for p in self.params)
        self.sizes = [int(p.grad.size) for p in self.params]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)
        self.buf = np.zeros(int(self.offsets[-1]), dtype=self.dtype)
        self.views = [None] * len(self.params)
        self._bind()

    def _bind(self):
        if not self.host:
            return
        for i, p in enumerate(self.params):
            if p.grad is self.views[i]:
                continue
            v = self.buf[self.offsets[i]:self.offsets[i + 1]].reshape(p.grad.shape)
            v[...] = p.grad
            p.grad = v
            p.keep_grad_array = True         # the layers must add into this view, not replace it
            self.views[i] = v

    def allreduce(self):
        """Sum every gradient over all ranks (one Allreduce, in place)."""
        if self.comm.Get_size() == 1:
            return
        for p in self.params:
            p.grad  # noqa: B018  (reading .grad fills a pending zero_grad: buf is summed directly)
        self._bind()  # a grad array replaced since (Module.to, load...) is copied in and re-bound
        if not self.host:  # device arrays: stage through the host buffer
            for i, p in enumerate(self.params):
                self.buf[self.offsets[i]:self.offsets[i + 1]] = to_numpy(p.grad).ravel()
        _allreduce_sum(self.comm, self.buf)
        if not self.host:
            for i, p in enumerate(self.params):
                p.grad[...] = _like(p.grad, self.buf[self.offsets[i]:self.offsets[i + 1]]
                                    .reshape(p.grad.shape))


def _like(ref, host):
    mod = type(ref).__module__.split(".")[0]
    if mod == "numpy":
        return host
    return __import__(mod).asarray(host)


def broadcast_model(model, comm, root=0):
    """Copy rank ``root``'s parameters and buffers to every rank."""
    if comm.Get_size() == 1:
        return model
    state = comm.bcast(model.state_dict() if comm.Get_rank() == root else None, root=root)
    model.load_state_dict(state)
    return model


# -- the loss normaliser -----------------------------------------------------------------------------
def _loss_normaliser(loss, logits, target):
    """The denominator of the loss's mean on this shard (float): it weights the shard's mean loss
    and gradient against the other ranks'. Returns (value, exact)."""
    if isinstance(loss, CrossEntropyLoss):
        t = np.asarray(to_numpy(target))
        valid = t != loss.ignore_index
        if loss.weight is None:
            return float(np.count_nonzero(valid)), True
        w = np.asarray(to_numpy(loss.weight), dtype=np.float64)
        return float(w[t[valid].astype(np.int64)].sum()), True
    if isinstance(loss, BCEWithLogitsLoss):
        return float(np.prod(logits.shape)), True
    return float(logits.shape[0]), False


# -- the trainer -------------------------------------------------------------------------------------
class DistributedTrainer(Trainer):
    """Trainer over MPI ranks; see the module docstring. Same constructor as Trainer, plus

    comm: an mpi4py communicator (default MPI.COMM_WORLD) or LocalComm();
    sync_batchnorm: convert BatchNorm2d layers to SyncBatchNorm (default True; without it each rank
        normalises with its own shard's statistics and the result depends on the number of ranks);
    abort_on_error: in fit, an exception on any rank aborts the whole job (default True).

    ``train_step(x, y, pixel_weight)`` takes the GLOBAL batch (identical on every rank) and trains on
    this rank's share; ``train_step_local`` takes each rank's own samples instead.
    """

    def __init__(self, model, optimizer, loss=None, scheduler=None, clip_grad_norm=None, callbacks=(),
                 comm=None, sync_batchnorm=True, abort_on_error=True):
        super().__init__(model, optimizer, loss=loss, scheduler=scheduler, clip_grad_norm=clip_grad_norm,
                         callbacks=callbacks)
        self.comm = world() if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.abort_on_error = bool(abort_on_error)
        if sync_batchnorm:
            convert_sync_batchnorm(model, self.comm)
        self._sync_layers = sync_batchnorm_layers(model)
        broadcast_model(model, self.comm)
        self._grads = GradientBuffer(optimizer.params, self.comm)
        self._subcomms = {}
        self._warned = False

    @property
    def is_root(self):
        return self.rank == 0

    # -- one step ------------------------------------------------------------------------------
    def train_step(self, x, y, pixel_weight=None):
        """One optimizer step on the global batch (x, y[, pixel_weight]), identical on every rank;
        this rank computes on its share only. Returns the global mean loss (same on every rank)."""
        n = len(x)
        counts = [stop - start for start, stop in (shard_range(n, self.size, r) for r in range(self.size))]
        a, b = shard_range(n, self.size, self.rank)
        w = pixel_weight[a:b] if pixel_weight is not None else None
        return self._step(x[a:b], y[a:b], w, counts)

    def train_step_local(self, x, y, pixel_weight=None):
        """One optimizer step where each rank passes its OWN samples (x may be empty on some ranks)."""
        sizes = np.zeros(self.size, dtype=np.int64)
        self.comm.Allgather(np.array([len(x)], dtype=np.int64), sizes)
        return self._step(x, y, pixel_weight, [int(s) for s in sizes])

    def _group(self, counts):
        """The communicator of the ranks holding samples this step (all ranks call this)."""
        active = tuple(c > 0 for c in counts)
        if all(active):
            return self.comm
        if active not in self._subcomms:
            color = 0 if active[self.rank] else _mpi().UNDEFINED
            self._subcomms[active] = self.comm.Split(color, self.rank)
        return self._subcomms[active]

    def _step(self, x, y, pixel_weight, counts):
        model = self.model
        model.train()
        if sum(counts) == 0:
            raise ValueError("DistributedTrainer: an empty global batch")
        group = self._group(counts)
        active = counts[self.rank] > 0
        for layer in self._sync_layers:
            layer.comm = group if active else None
        grads, is_list, den, local = None, False, 0.0, 0.0
        if active:
            outs = model.forward(x)
            is_list = isinstance(outs, list)
            heads = outs if is_list else [outs]
            kw = {"pixel_weight": pixel_weight} if pixel_weight is not None else {}
            grads = []
            for logits in heads:
                local += float(self.loss.forward(logits, y, **kw)) / len(heads)
                grads.append(self.loss.backward() / len(heads))
            den, exact = _loss_normaliser(self.loss, heads[0], y)
            if not exact and not self._warned and self.is_root and self.size > 1:
                warnings.warn(f"DistributedTrainer: {type(self.loss).__name__} is not a mean over "
                              f"pixels; the ranks' losses are averaged by sample count, which is not "
                              f"exactly the loss of the whole batch", stacklevel=2)
                self._warned = True
        stats = np.array([den, local * den if den > 0 else 0.0], dtype=np.float64)
        _allreduce_sum(self.comm, stats)
        total = stats[1] / stats[0] if stats[0] > 0 else math.nan
        if not math.isfinite(total):  # the same verdict on every rank: all raise together
            lr = getattr(self.optimizer, "lr", None)
            raise TrainingError(
                f"the loss became {total} at step {self.step + 1} (epoch {self.epoch + 1}); the weights "
                f"were not updated. Likely cause: the learning rate ({lr}) is too high, or the input "
                f"holds NaN/inf values")
        self.optimizer.zero_grad()
        if active:
            scale = den / stats[0]
            if scale != 1.0:
                grads = [g * scale for g in grads]
            model.backward(grads if is_list else grads[0], input_grad=False)
        self._grads.allreduce()
        if not all(c > 0 for c in counts):
            self._share_running_stats(counts)
        if self.clip is not None:
            from .optim import clip_grad_norm_
            clip_grad_norm_(model.parameters(), self.clip)
        self.optimizer.step()
        self.step += 1
        return float(total)

    def _share_running_stats(self, counts):
        """Ranks idle this step did not see the batch statistics: copy the running statistics of the
        first busy rank (rare: only batches smaller than the number of ranks)."""
        if not self._sync_layers:
            return
        root = next(r for r, c in enumerate(counts) if c > 0)
        names = ("running_mean", "running_var", "num_batches_tracked")
        mine = [[np.array(to_numpy(getattr(m, k))) for k in names] for m in self._sync_layers
                if m.track_running_stats]
        theirs = self.comm.bcast(mine if self.rank == root else None, root=root)
        if self.rank != root:
            layers = [m for m in self._sync_layers if m.track_running_stats]
            for m, values in zip(layers, theirs):
                for k, v in zip(names, values):
                    getattr(m, k)[...] = m.backend.asarray(v)

    # -- a whole run -----------------------------------------------------------------------------
    def fit(self, data, masks=None, epochs=None, out_dir=None, progress=None, **kwargs):
        """Trainer.fit (either form) on every rank: the same seed gives the same global batches and
        validation split; rank 0 alone validates, writes out_dir, reports progress and calls the
        callbacks. An error on any rank aborts the job (abort_on_error)."""
        root = self.is_root
        callbacks = self.callbacks
        if not root:
            self.callbacks = []
        guard = abort_on_error(self.comm) if self.abort_on_error else contextlib.nullcontext()
        try:
            with guard:
                return super().fit(data, masks, epochs, out_dir=out_dir if root else None,
                                   progress=progress if root else None, **kwargs)
        finally:
            self.callbacks = callbacks

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, path):
        """Rank 0 writes the checkpoint; the other ranks do nothing."""
        if self.is_root:
            super().save(path)

    def resume(self, path):
        """Rank 0 reads the checkpoint and broadcasts weights, optimizer state, counters and RNG to
        the others (the file need exist on rank 0 only). A bad file raises on every rank."""
        payload, error = None, None
        if self.is_root:
            try:
                super().resume(path)
                payload = ("ok", self.model.state_dict(), self.optimizer.state_dict(), self._meta())
            except Exception as exc:  # noqa: BLE001 -- re-raised on every rank below
                payload = ("error", type(exc).__name__, str(exc))
                error = exc
        payload = self.comm.bcast(payload, root=0)
        if payload[0] == "error":
            if self.is_root:
                raise error
            raise ValueError(f"resume failed on rank 0: {payload[1]}: {payload[2]}")
        if not self.is_root:
            _, state, opt_state, meta = payload
            self.model.load_state_dict(state)
            self.optimizer.load_state_dict(opt_state)
            from .train import rng_from_state
            self.epoch, self.step = int(meta["epoch"]), int(meta["step"])
            self.rng = rng_from_state(meta["rng"])
            self.history = list(meta.get("history", []))
            self.best = meta["best"] if meta.get("best") is not None else -math.inf
            if self.scheduler is not None and meta.get("scheduler") is not None:
                self.scheduler.load_state_dict(meta["scheduler"])
        self._grads = GradientBuffer(self.optimizer.params, self.comm)
        return self

