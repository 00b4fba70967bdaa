"""Launched by tests/test_distributed.py as ``mpiexec -n K python tests/_mpi_train.py OUT [options]``.

Trains a tiny float64 model with DistributedTrainer on a small synthetic set (no augmentation) and, on
rank 0, writes OUT (an .npz of the final state_dict plus the loss per step). Every rank checks that its
weights are bit-identical to rank 0's. --fail-rank R makes rank R raise --fail-with at its --fail-step'th batch.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import unet_np  # noqa: E402
from unet_np.data.synthetic import shapes  # noqa: E402
from unet_np.distributed import DistributedTrainer, world  # noqa: E402
from unet_np.nn import CrossEntropyLoss  # noqa: E402
from unet_np.optim import SGD  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--arch", default="unet", choices=("unet", "unet++"))
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--fail-rank", type=int, default=-1)
    ap.add_argument("--fail-step", type=int, default=2)
    ap.add_argument("--fail-with", choices=("RuntimeError", "OSError", "KeyboardInterrupt"),
                    default="RuntimeError")
    args = ap.parse_args()
    comm = world()

    images, masks = shapes(args.n, size=16, seed=3)
    images = images.astype(np.float64)
    masks[:, :2, :2] = -1                                   # some ignored pixels
    if args.arch == "unet":
        model = unet_np.UNet(1, 3, depth=2, base_channels=4, batchnorm=True, dtype="float64")
    else:
        model = unet_np.UNetPlusPlus(1, 3, depth=2, base_channels=4, batchnorm=True,
                                     deep_supervision=True, dtype="float64")
    # Deliberately different initial weights on each rank: the trainer must broadcast rank 0's.
    rng = np.random.default_rng(100 + comm.Get_rank())
    init = np.random.default_rng(7)
    for p in model.parameters():
        p.data[...] = init.standard_normal(p.data.shape) * 0.2
    if comm.Get_rank() > 0:
        model.parameters()[0].data[...] += rng.standard_normal(model.parameters()[0].data.shape)

    calls = [0]

    def augment(x, y, w, rng):                            # the identity, or a deliberate failure
        calls[0] += 1
        if comm.Get_rank() == args.fail_rank and calls[0] == args.fail_step:
            error = {"RuntimeError": RuntimeError, "OSError": OSError,
                     "KeyboardInterrupt": KeyboardInterrupt}[args.fail_with]
            raise error(f"deliberate failure on rank {comm.Get_rank()} at batch {calls[0]}")
        return x, y, w

    losses = []
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss = CrossEntropyLoss(weight=np.array([1.0, 2.0, 0.5]), ignore_index=-1)
    trainer = DistributedTrainer(model, opt, loss=loss, comm=comm,
                                 callbacks=[lambda ev, info: losses.append(info["loss"]) if ev == "step"
                                            else None])
    trainer.fit(images, masks, epochs=args.epochs, batch_size=args.batch_size, seed=11,
                augment=augment if args.fail_rank >= 0 else None)

    state = model.state_dict()
    flat = np.concatenate([np.ravel(v).astype(np.float64) for v in state.values()])
    ref = comm.bcast(flat if comm.Get_rank() == 0 else None, root=0)
    if not np.array_equal(ref, flat):
        raise SystemExit(f"rank {comm.Get_rank()}: weights differ from rank 0's by "
                         f"{np.abs(ref - flat).max()}")
    if comm.Get_rank() == 0:
        np.savez(args.out, losses=np.array(losses), **state)
        print(f"ranks={comm.Get_size()} steps={trainer.step} final loss={losses[-1]:.6f}")


if __name__ == "__main__":
    main()
