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
import numbers
import os
import time

import numpy as np

from . import metrics
from .backends import to_numpy
from .data import pipeline
from .nn.loss import CrossEntropyLoss
from .nn.shapes import pair


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
    run_meta: a JSON-able dict saved in every checkpoint (read back as ``checkpoint.meta['data']``):
    what a later run needs to know about this one. fit(dataset) adds how the images were
    normalised and the masks written (normalize, mean, std, mask_convention, palette, ...), which
    ``unet-np predict`` and ``evaluate`` use; keys given here win.
    """

    is_root = True          # the process that validates and writes (DistributedTrainer: rank 0)

    def __init__(self, model, optimizer, loss=None, scheduler=None, clip_grad_norm=None, callbacks=(),
                 run_meta=None):
        self.model, self.optimizer = model, optimizer
        self.loss = loss if loss is not None else CrossEntropyLoss()
        self.scheduler, self.clip = scheduler, clip_grad_norm
        self.callbacks = list(callbacks)
        self.run_meta = dict(run_meta or {})
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
    def fit(self, data, masks=None, epochs=None, batch_size=4, val=None, crop=None, augment=None,
            weight_map=False, pixel_weights=None, seed=0, out_dir=None, checkpoint_every=1,
            progress=None):
        """Train up to ``epochs`` epochs in total (a resumed trainer goes on from its epoch).

        Two forms:
          fit(dataset, epochs, ...)      a SegmentationDataset (e.g. from data.load_folder), images of
                                         any sizes; see below
          fit(images, masks, epochs, ...) arrays (N, C, H, W) and (N, H, W) of one size

        batch_size: samples per optimizer step.
        val: validation data, scored (Dice, IoU, pixel accuracy) after each epoch: (images, masks)
            arrays; with a dataset also another SegmentationDataset, or a fraction in (0, 1) of the
            dataset held out by a shuffle seeded by ``seed`` (data.pipeline.split).
        crop (dataset form): None (the largest size every image gives that the model takes: whole
            images when they share a valid size), an int or (h, w). Each sample is cropped at random.
        augment: None, 'none', 'basic' (flips, quarter turns), 'elastic' (those and the paper's
            elastic deformation), or a callable. Dataset form: f(image, mask, weight, rng) per sample
            (data.flip_rotate's signature); array form: f(x, y, w, rng) on the whole batch.
        weight_map (dataset form): weight the loss by the paper's weight map (dataset.compute_weights,
            computed here if the dataset has none). pixel_weights (array form): (N, H, W) weights.
        seed: seeds the generator that shuffles, crops and augments (its state is checkpointed, so a
            resumed run continues bit for bit).
        out_dir: where model.npz (best validation Dice, or lowest loss without validation) and
            last.npz (resumable) go, every ``checkpoint_every`` epochs and at the end.
        progress: optional f(epoch, batch_index, n_batches, loss), e.g. for a progress bar.
        Returns the history: one dict per epoch (epoch, step, loss, seconds, val_dice, ...).
        """
        if hasattr(data, "images") and hasattr(data, "masks"):          # a SegmentationDataset
            if masks is not None:
                if epochs is None and isinstance(masks, numbers.Integral):
                    epochs, masks = masks, None                        # fit(dataset, 30)
                else:
                    raise TypeError("fit(dataset, epochs, ...): the dataset holds the masks; pass "
                                    "no masks beside it")
            if epochs is None:
                raise TypeError("fit(dataset, epochs, ...) needs epochs")
            if pixel_weights is not None:
                raise TypeError("fit(dataset, ...) takes weight_map=True, not pixel_weights (the "
                                "weights are the dataset's: dataset.weights)")
            images, masks, pixel_weights, val, augment = self._from_dataset(
                data, val, crop, augment, weight_map, seed)
        else:
            if masks is None or epochs is None:
                raise TypeError("fit(images, masks, epochs, ...) needs images, masks and epochs (or "
                                "fit(dataset, epochs, ...))")
            if crop is not None or weight_map:
                raise TypeError("crop= and weight_map= belong to the dataset form, fit(dataset, "
                                "epochs, ...); arrays are used as they are")
            images, masks = np.asarray(data), np.asarray(masks)
            if isinstance(augment, str):                               # a name: per sample
                augment = pipeline.augmentation(augment)
                augment = None if augment is None else pipeline.per_sample(augment)
        return self._fit(images, masks, epochs, batch_size, val, pixel_weights, augment, out_dir,
                         seed, checkpoint_every, progress)

    def _from_dataset(self, ds, val, crop, augment, weight_map, seed):
        """The dataset form's training samples (object arrays: sizes may differ), their weights, the
        validation batch (cropped at the centre) and the per-sample batcher; fills run_meta with
        what prediction needs (how images were normalised, how masks were written)."""
        model = self.model
        if len(ds) == 0:
            raise ValueError("the dataset is empty")
        if weight_map and ds.weights is None:
            ds.compute_weights()
        train_idx = np.arange(len(ds))
        val_images = val_masks = None
        if isinstance(val, numbers.Real) and not isinstance(val, bool):
            train_idx, val_idx = pipeline.split(len(ds), float(val), seed)
            val_images = [ds.images[i] for i in val_idx]
            val_masks = [ds.masks[i] for i in val_idx]
        elif hasattr(val, "images") and hasattr(val, "masks"):
            val_images, val_masks = list(val.images), list(val.masks)
        elif val is not None:
            val_images, val_masks = list(val[0]), list(val[1])
        sizes = [ds.masks[i].shape for i in train_idx]
        dims = getattr(ds, "spatial_dims", 2)
        if dims != getattr(model, "spatial_dims", 2):
            kind = {2: "images (H, W)", 3: "volumes (D, H, W)"}
            raise ValueError(f"the dataset holds {kind[dims]}, the model takes "
                             f"{kind[getattr(model, 'spatial_dims', 2)]} (spatial_dims)")
        if crop is None:
            crop = pipeline.crop_size(model, sizes)
        else:
            crop = pair(crop, "crop", dims=dims)
            model.check_size(crop)
            small = [ds.names[i] for i in train_idx
                     if any(n < c for n, c in zip(ds.masks[i].shape, crop))]
            if small:
                raise ValueError(f"{small[0]}: image is smaller than the crop {'x'.join(map(str, crop))}"
                                 + (f" (and {len(small) - 1} more)" if len(small) > 1 else ""))
        pick = lambda items: pipeline.object_array([items[i] for i in train_idx])  # noqa: E731
        images, masks = pick(ds.images), pick(ds.masks)
        weights = pick(ds.weights) if weight_map else None
        val_batch = None
        if val_images:
            vcrop = pipeline.crop_size(model, [m.shape for m in val_masks] + [crop])
            centre = pipeline.make_batcher(model, vcrop, None, random_crop=False)
            val_batch = centre(val_images, val_masks, None, None)[:2]
        self.run_meta = {
            "normalize": ds.normalize, "mean": ds.mean, "std": ds.std,
            "mask_convention": ds.mask_convention, "palette": ds.palette,
            "num_classes": model.num_classes, "in_channels": ds.in_channels,
            "train_size": list(crop), "weight_map": bool(weight_map), **self.run_meta}
        return images, masks, weights, val_batch, pipeline.make_batcher(model, crop, augment)

    def _fit(self, images, masks, epochs, batch_size, val, pixel_weights, augment, out_dir, seed,
             checkpoint_every, progress):
        """The loop: a seeded shuffle per epoch, batches through ``augment`` (which, in the dataset
        form, also crops and stacks), a step per batch, validation and checkpoints per epoch."""
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
            if val is not None and self.is_root:
                pred = predict_labels(self.model, val[0], batch_size)
                ev = metrics.evaluate(pred, np.asarray(val[1]), self.model.num_classes)
                record.update(val_dice=ev["dice"], val_iou=ev["iou"], val_accuracy=ev["pixel_accuracy"])
            self.history.append(record)
            for cb in self.callbacks:
                cb("epoch", dict(record))
            if out_dir is not None and (self.epoch % checkpoint_every == 0 or self.epoch == epochs):
                self._save(out_dir, record)
        return self.history

    # -- checkpoints ---------------------------------------------------------------------------
    def _meta(self):
        # run_meta is stored under "data" (the key earlier checkpoints used for it)
        return {"epoch": self.epoch, "step": self.step, "rng": rng_state(self.rng),
                "history": self.history, "best": self.best if math.isfinite(self.best) else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "data": self.run_meta}

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
        self.run_meta = dict(meta.get("data") or {}, **self.run_meta)
        self.history = list(meta.get("history", []))
        self.best = meta["best"] if meta.get("best") is not None else -math.inf
        if self.scheduler is not None and meta.get("scheduler") is not None:
            self.scheduler.load_state_dict(meta["scheduler"])
        return self
