"""Helper for the SIGKILL atomicity test in test_checkpoint.py (not a test module itself).

Run as ``python tests/_ckpt_writer.py PATH`` (POSIX only). It imports NumPy and the checkpoint module
once, builds the two checkpoints A and B, and then serves the test over stdin/stdout:

* for each line ``go`` it forks a writer process, which saves A to PATH, prints ``ready <pid>``, and
  then keeps overwriting PATH with B, A, B, ... until it is killed (or, as a safety net against
  orphans, after 60 seconds);
* when that writer has ended (the test kills it with SIGKILL), it prints ``ended <signal>``
  (``ended 0`` or ``ended -<exit code>`` if it ended on its own).

Forking a ready process makes each of the test's writers start in a millisecond instead of paying
for a fresh interpreter and NumPy import every time. ``payload(which)`` builds A and B
deterministically, so the test can compare what it reads with exactly what was written.

The checkpoint module is loaded straight from unet_np/checkpoint.py (it needs only NumPy), so the
helper does not depend on the rest of the package importing cleanly.
"""
import importlib.util
import os
import sys
import time

import numpy as np

CHECKPOINT_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "unet_np", "checkpoint.py")


def load_checkpoint_module():
    spec = importlib.util.spec_from_file_location("_unet_np_checkpoint_for_writer", CHECKPOINT_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def payload(which):
    """(config, arrays, optimizer, meta) of checkpoint 'A' or 'B', about 3.5 MB each."""
    seed = {"A": 1, "B": 2}[which]
    rng = np.random.default_rng(seed)
    arrays = {
        "enc.0.weight": rng.standard_normal((256, 256, 3, 3)).astype(np.float32),  # 2.25 MiB
        "enc.0.bias": rng.standard_normal(256).astype(np.float32),
        "bn.num_batches_tracked": np.array(seed * 1000, dtype=np.int64),
    }
    optimizer = {"enc.0.weight.momentum": rng.standard_normal((128, 256, 3, 3)).astype(np.float32),
                 "step": np.array(seed, dtype=np.int64)}
    config = {"model": "UNet", "depth": 2, "which": which}
    meta = {"which": which, "epoch": seed}
    return config, arrays, optimizer, meta


def write_forever(ckpt, path, data):
    """The writer: A once, 'ready', then B, A, B, ... (runs in the forked child)."""
    deadline = time.monotonic() + 60.0
    ckpt.save_checkpoint(path, *data["A"])
    print(f"ready {os.getpid()}", flush=True)
    i = 1
    while time.monotonic() < deadline:
        ckpt.save_checkpoint(path, *data["AB"[i % 2]])
        i += 1


def serve(path):
    ckpt = load_checkpoint_module()
    data = {w: payload(w) for w in "AB"}
    for line in sys.stdin:
        if line.strip() != "go":
            break
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the writer
            code = 0
            try:
                write_forever(ckpt, path, data)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        ended = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
        print(f"ended {ended}", flush=True)


if __name__ == "__main__":
    serve(sys.argv[1])
