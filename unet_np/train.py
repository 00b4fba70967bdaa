"""A small training loop: mini-batches, loss, backward, optimizer step, validation, checkpoints.

    trainer = Trainer(model, optimizer, loss=CrossEntropyLoss())
    history = trainer.fit(images, masks, epochs=10, batch_size=4, val=(val_images, val_masks),
                          out_dir="out", seed=0)

Everything random (shuffling, augmentation) draws from one Generator whose state goes into the
checkpoint, so ``Trainer.resume(path)`` continues bit for bit as the uninterrupted run would.
A loss that becomes NaN or infinite stops training with TrainingError naming the step, before the
weights are touched; the last good checkpoint is never overwritten by non-finite weights.
"""
import json
import math
import os
import time

import numpy as np

from . import metrics as _metrics
from .backends import to_numpy
from .nn.loss import CrossEntropyLoss
from .nn.module import no_grad


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or weights)."""


def rng_state(rng):
    return json.loads(json.dumps(rng.bit_generator.state))


def rng_from_state(state):
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


def predict_labels(model, x, batch_size=4):
    """Class index per pixel (N, H, W) for images x (N, C, H, W), without keeping activations."""
    out = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            logits = model.predict(x[i:i + batch_size])
            logits = logits[-1] if isinstance(logits, list) else logits
            out.append(to_numpy(logits).argmax(axis=1))
    finally:
        model.train(was_training)
    return np.concatenate(out)


class Trainer:
    """Trains ``model`` with ``optimizer`` on ``loss`` (default: CrossEntropyLoss).

    callbacks: callables ``cb(event, info)`` with event in {'step', 'epoch'}; info is a dict
    (epoch, step, loss, and for 'epoch' the validation metrics).
    """

    def __init__(self, model, optimizer, loss=None, scheduler=None, clip_grad_norm=None, callbacks=()):
        self.model, self.optimizer = model, optimizer
        self.loss = loss if loss is not None else CrossEntropyLoss()
        self.scheduler, self.clip = scheduler, clip_grad_norm
        self.callbacks = list(callbacks)
        self.step = 0
        self.epoch = 0
        self.rng = np.random.default_rng(0)
        self.history = []
        self.best = -math.inf

    # -- one step ------------------------------------------------------------------------------
    def train_step(self, x, y, pixel_weight=None):
        """Forward, loss, backward, optimizer step on one batch; returns the loss (float)."""
        model = self.model
        model.train()
        outs = model.forward(x)
        heads = outs if isinstance(outs, list) else [outs]
        total, grads = 0.0, []
        for logits in heads:  # deep supervision: the loss averaged over every output
            kw = {"pixel_weight": pixel_weight} if pixel_weight is not None else {}
            total += float(self.loss.forward(logits, y, **kw)) / len(heads)
            grads.append(self.loss.backward() / len(heads))
        if not math.isfinite(total):
            lr = getattr(self.optimizer, "lr", None)
            raise TrainingError(
                f"the loss became {total} at step {self.step + 1} (epoch {self.epoch + 1}); the weights "
                f"were not updated. Likely cause: the learning rate ({lr}) is too high, or the input "
                f"holds NaN/inf values")
        self.optimizer.zero_grad()
        model.backward(grads if isinstance(outs, list) else grads[0], input_grad=False)
        if self.clip is not None:
            from .optim import clip_grad_norm_
            clip_grad_norm_(model.parameters(), self.clip)
        self.optimizer.step()
        self.step += 1
        return total

    # -- a whole run ---------------------------------------------------------------------------
    def fit(self, images, masks, epochs, batch_size=4, val=None, pixel_weights=None, augment=None,
            out_dir=None, seed=0, checkpoint_every=1, progress=None):
        """Train for ``epochs`` epochs over (images (N,C,H,W), masks (N,H,W)).

        augment: optional ``f(x, y, w, rng) -> (x, y, w)`` applied to each batch.
        out_dir: where model.npz (best validation Dice, or last without validation) and last.npz go.
        progress: optional ``f(epoch, batch_index, n_batches, loss)`` for a progress bar.
        Returns the history: one dict per epoch.
        """
        images = np.asarray(images)
        masks = np.asarray(masks)
        if len(images) != len(masks):
            raise ValueError(f"got {len(images)} images but {len(masks)} masks")
        if len(images) == 0:
            raise ValueError("no training images")
        if self.step == 0 and self.epoch == 0:
            self.rng = np.random.default_rng(seed)
        n = len(images)
        while self.epoch < epochs:
            order = self.rng.permutation(n)
            losses = []
            t0 = time.perf_counter()
            n_batches = (n + batch_size - 1) // batch_size
            for b in range(n_batches):
                idx = np.sort(order[b * batch_size:(b + 1) * batch_size])
                x, y = images[idx], masks[idx]
                w = pixel_weights[idx] if pixel_weights is not None else None
                if augment is not None:
                    x, y, w = augment(x, y, w, self.rng)
                loss = self.train_step(x, y, w)
                losses.append(loss)
                if self.scheduler is not None and getattr(self.scheduler, "per_step", False):
                    self.scheduler.step()
                if progress is not None:
                    progress(self.epoch, b, n_batches, loss)
                for cb in self.callbacks:
                    cb("step", {"epoch": self.epoch, "step": self.step, "loss": loss})
            if self.scheduler is not None and not getattr(self.scheduler, "per_step", False):
                self.scheduler.step()
            self.epoch += 1
            record = {"epoch": self.epoch, "step": self.step, "loss": float(np.mean(losses)),
                      "seconds": time.perf_counter() - t0}
            if val is not None:
                pred = predict_labels(self.model, val[0], batch_size)
                ev = _metrics.evaluate(pred, np.asarray(val[1]), self.model.num_classes)
                record.update(val_dice=ev["dice"], val_iou=ev["iou"], val_accuracy=ev["pixel_accuracy"])
            self.history.append(record)
            for cb in self.callbacks:
                cb("epoch", dict(record))
            if out_dir is not None and (self.epoch % checkpoint_every == 0 or self.epoch == epochs):
                self._save(out_dir, record)
        return self.history

    # -- checkpoints ---------------------------------------------------------------------------
    def _meta(self):
        return {"epoch": self.epoch, "step": self.step, "rng": rng_state(self.rng),
                "history": self.history, "best": self.best if math.isfinite(self.best) else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def _save(self, out_dir, record):
        os.makedirs(out_dir, exist_ok=True)
        for p in self.model.parameters():
            if not np.all(np.isfinite(to_numpy(p.data))):
                raise TrainingError(f"non-finite weights after step {self.step}; the last good "
                                    f"checkpoint in {out_dir} was left untouched")
        self.model.save(os.path.join(out_dir, "last.npz"), optimizer=self.optimizer, meta=self._meta())
        score = record.get("val_dice", -record["loss"])
        if score > self.best:
            self.best = score
            self.model.save(os.path.join(out_dir, "model.npz"), optimizer=self.optimizer, meta=self._meta())

    def save(self, path):
        """Write a resumable checkpoint (model, optimizer, epoch, step, RNG state)."""
        self.model.save(path, optimizer=self.optimizer, meta=self._meta())

    def resume(self, path):
        """Restore model weights, optimizer state, counters and the RNG from a checkpoint."""
        from .checkpoint import load_checkpoint
        ck = load_checkpoint(path)
        self.model.load_state_dict(ck.arrays)
        if ck.optimizer is None:
            raise ValueError(f"cannot resume from {path}: it holds no optimizer state")
        self.optimizer.load_state_dict(ck.optimizer)
        meta = ck.meta
        self.epoch, self.step = int(meta["epoch"]), int(meta["step"])
        self.rng = rng_from_state(meta["rng"])
        self.history = list(meta.get("history", []))
        self.best = meta["best"] if meta.get("best") is not None else -math.inf
        if self.scheduler is not None and meta.get("scheduler") is not None:
            self.scheduler.load_state_dict(meta["scheduler"])
        return self
