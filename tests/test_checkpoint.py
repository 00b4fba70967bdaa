"""The checkpoint format: round trip, every kind of bad file, no unpickling, atomic writes."""
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from unet_np import checkpoint as ckpt
from unet_np.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

from . import _ckpt_writer

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ckpt_writer.py")


# -- helpers ----------------------------------------------------------------------------------------
def sample():
    """(config, arrays, optimizer, meta) with many dtypes and shapes."""
    rng = np.random.default_rng(0)
    arrays = {
        "enc1.0.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "enc1.0.bias": rng.standard_normal(4),                                   # float64
        "bn.running_mean": np.asfortranarray(rng.standard_normal((3, 5))),       # Fortran order
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),                   # 0-d int64
        "scale": np.array(0.5, dtype=np.float32),                                # 0-d float32
        "mask": np.array([True, False, True]),
        "bytes": np.arange(10, dtype=np.uint8),
        "int8": np.array([-128, 0, 127], dtype=np.int8),
        "complex": np.array([1 + 2j, -3j], dtype=np.complex64),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "big.int": np.array([2**62, -2**62], dtype=np.int64),
    }
    optimizer = {"state.0.exp_avg": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
                 "state.0.step": np.array(12, dtype=np.int64),
                 "param_groups.0.lr": np.array(1e-3)}
    config = {"model": "UNet", "in_channels": 1, "num_classes": 2, "depth": 2,
              "padding": "same", "channels": [64, 128], "nested": {"a": None, "b": True, "c": 1.5},
              "text": "ünïcødé"}
    meta = {"epoch": 3, "step": 1200, "loss": 0.25, "history": [1.0, 0.5]}
    return config, arrays, optimizer, meta


def assert_same_arrays(got, want):
    assert list(got) == list(want)  # the order is kept
    for k in want:
        w = np.asarray(want[k])
        assert got[k].dtype == w.dtype, k
        assert got[k].shape == w.shape, k
        assert np.array_equal(got[k], w), k


def members(path):
    """name -> raw bytes of every zip member."""
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info.filename) for info in zf.infolist()}


def npy_bytes(arr, allow_pickle=False):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def rewrite(src, dst, replace=None, drop=(), add=None):
    """Copy the zip at src to dst with some members replaced (name -> raw bytes), dropped or added.
    The zip's own CRCs are right, so only the checkpoint's checks can catch the change."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            zout.writestr(info.filename, replace.get(info.filename, zin.read(info.filename)))
        for name, data in (add or {}).items():
            zout.writestr(name, data)


def temp_files(folder):
    return [f for f in os.listdir(folder) if f.endswith(".tmp")]


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.npz"
    save_checkpoint(path, *sample())
    return path


def expect_rejected(path, *words):
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"not a unet_np checkpoint: {os.fspath(path)}: "), msg
    for w in words:
        assert w in msg, msg
    return msg


# -- round trip -------------------------------------------------------------------------------------
def test_round_trip(saved):
    config, arrays, optimizer, meta = sample()
    c = load_checkpoint(saved)
    assert isinstance(c, Checkpoint)
    assert c.format_version == ckpt.FORMAT_VERSION == 1
    assert c.config == config
    assert c.meta == meta
    assert_same_arrays(c.arrays, arrays)
    assert_same_arrays(c.optimizer, optimizer)
    assert c.arrays["bn.num_batches_tracked"].shape == ()


def test_layout_is_plain_npz(saved):
    """Readable with plain np.load (no pickle); text members are bytes, never object arrays."""
    with np.load(saved, allow_pickle=False) as z:
        names = set(z.files)
        assert {"__format__", "__config__", "__meta__", "__checksum__", "__optim__"} <= names
        assert "model/enc1.0.weight" in names and "optim/state.0.step" in names
        assert str(z["__format__"]) == "unet_np-checkpoint/1"
        assert z["__config__"].dtype == np.uint8
        assert json.loads(z["__config__"].tobytes().decode()) == sample()[0]
        assert json.loads(z["__meta__"].tobytes().decode()) == sample()[3]
        assert z["__checksum__"].shape == (32,)
        for n in z.files:
            assert z[n].dtype != object
    with zipfile.ZipFile(saved) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())


def test_optimizer_none_empty_and_meta_default(tmp_path):
    p = tmp_path / "a.npz"
    save_checkpoint(p, {"x": 1}, {"w": np.ones(2)})
    c = load_checkpoint(p)
    assert c.optimizer is None and c.meta == {} and c.config == {"x": 1}
    save_checkpoint(p, {"x": 1}, {"w": np.ones(2)}, optimizer={})
    assert load_checkpoint(p).optimizer == {}


def test_numpy_values_in_config_become_json(tmp_path):
    p = tmp_path / "a.npz"
    save_checkpoint(p, {"dtype": np.float32, "d": np.dtype("float64"), "n": np.int64(3),
                        "f": np.float32(0.5), "b": np.bool_(True), "l": np.arange(3)},
                    {"w": np.ones(2)})
    assert load_checkpoint(p).config == {"dtype": "float32", "d": "float64", "n": 3, "f": 0.5,
                                         "b": True, "l": [0, 1, 2]}


@given(hnp.arrays(dtype=st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.uint8,
                                         np.bool_, np.int16]),
                  shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
                  elements={"allow_nan": False, "allow_infinity": False}))
def test_round_trip_any_array(tmp_path_factory, arr):
    p = tmp_path_factory.mktemp("h") / "a.npz"
    save_checkpoint(p, {}, {"a": arr, "b.t": arr.T})
    assert_same_arrays(load_checkpoint(p).arrays, {"a": arr, "b.t": arr.T})


def test_save_is_deterministic(tmp_path):
    save_checkpoint(tmp_path / "a.npz", *sample())
    save_checkpoint(tmp_path / "b.npz", *sample())
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_existing_file_mode_is_kept(saved):
    os.chmod(saved, 0o640)
    save_checkpoint(saved, *sample())
    assert os.stat(saved).st_mode & 0o777 == 0o640


# -- what save refuses ------------------------------------------------------------------------------
@pytest.mark.parametrize("section", ["arrays", "optimizer"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused_and_old_file_kept(saved, section, bad):
    before = saved.read_bytes()
    config, arrays, optimizer, meta = sample()
    target = arrays if section == "arrays" else optimizer
    key = "enc1.0.weight" if section == "arrays" else "state.0.exp_avg"
    target[key] = target[key].copy()
    target[key][0, 0, 1, 1] = bad
    with pytest.raises(ValueError, match=r"non-finite") as info:
        save_checkpoint(saved, config, arrays, optimizer, meta)
    assert key in str(info.value)
    assert saved.read_bytes() == before
    assert temp_files(saved.parent) == []


@pytest.mark.parametrize("value", [np.array([{"a": 1}], dtype=object), np.array(["text"]),
                                   np.array([b"x"]), np.array(["2020-01-01"], dtype="datetime64[D]"),
                                   np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])])
def test_non_numeric_dtype_refused(saved, value):
    before = saved.read_bytes()
    config, arrays, optimizer, meta = sample()
    arrays["bad.entry"] = value
    with pytest.raises(ValueError, match=r"model/bad\.entry"):
        save_checkpoint(saved, config, arrays, optimizer, meta)
    assert saved.read_bytes() == before


def test_bad_arguments(tmp_path):
    p = tmp_path / "a.npz"
    with pytest.raises(TypeError):
        save_checkpoint(p, "not a dict", {"w": np.ones(1)})
    with pytest.raises(TypeError):
        save_checkpoint(p, {}, [np.ones(1)])
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(p, {"f": float("nan")}, {"w": np.ones(1)})
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(p, {}, {"w": np.ones(1)}, meta={"obj": object()})
    with pytest.raises(ValueError, match="names"):
        save_checkpoint(p, {}, {"": np.ones(1)})
    with pytest.raises(ValueError, match="names"):
        save_checkpoint(p, {}, {3: np.ones(1)})
    assert os.listdir(tmp_path) == []


# -- failed saves leave the old file ----------------------------------------------------------------
class Boom(RuntimeError):
    pass


def test_failure_mid_write_keeps_old_file(saved, monkeypatch):
    before = saved.read_bytes()
    real = ckpt._write_member
    calls = []

    def failing(zf, name, arr):
        calls.append(name)
        if len(calls) == 5:
            raise Boom("disk on fire")
        real(zf, name, arr)

    monkeypatch.setattr(ckpt, "_write_member", failing)
    with pytest.raises(Boom):
        save_checkpoint(saved, *sample())
    assert len(calls) == 5
    assert saved.read_bytes() == before
    assert temp_files(saved.parent) == []


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_failure_at_fsync_or_replace_keeps_old_file(saved, monkeypatch, step):
    before = saved.read_bytes()

    def fail(*args):
        raise OSError(5, "simulated I/O error")

    monkeypatch.setattr(ckpt.os, step, fail)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(saved, {"other": 1}, {"w": np.zeros(3)})
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert temp_files(saved.parent) == []
    assert load_checkpoint(saved).config == sample()[0]


def test_ctrl_c_during_a_save_is_held_until_the_file_is_complete(saved, monkeypatch):
    """SIGINT in the middle of writing: the new file is finished and in place, then KeyboardInterrupt
    is raised (interrupted inside the zip writer, it was left half-closed and printed an error)."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT has a handler of its own here")
    real, calls = ckpt._write_member, []

    def interrupted(zf, name, arr):
        calls.append(name)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        real(zf, name, arr)

    monkeypatch.setattr(ckpt, "_write_member", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(saved, {"other": 2}, {"w": np.arange(3.0)})
    monkeypatch.undo()
    assert load_checkpoint(saved).config == {"other": 2}
    assert temp_files(saved.parent) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_full_disk_error_names_the_checkpoint(saved, monkeypatch):
    """Writing raises OSError(28) without a file name (as a full disk does): the error names the path."""
    before = saved.read_bytes()

    def full(zf, name, arr):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_member", full)
    with pytest.raises(OSError) as info:
        save_checkpoint(saved, *sample())
    assert info.value.errno == 28 and info.value.filename == str(saved)
    assert str(saved) in str(info.value)
    assert saved.read_bytes() == before and temp_files(saved.parent) == []


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        save_checkpoint(tmp_path / "nope" / "a.npz", {}, {"w": np.ones(1)})
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="permissions do not stop root")
def test_unwritable_directory_keeps_old_file(saved):
    before = saved.read_bytes()
    os.chmod(saved.parent, 0o500)
    try:
        with pytest.raises(PermissionError):
            save_checkpoint(saved, {}, {"w": np.ones(1)})
    finally:
        os.chmod(saved.parent, 0o700)
    assert saved.read_bytes() == before
    assert temp_files(saved.parent) == []


# -- bad files ----------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    p = tmp_path / "absent.npz"
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_checkpoint(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.npz"
    p.write_bytes(b"")
    expect_rejected(p, "empty")


def test_directory(tmp_path):
    expect_rejected(tmp_path, "directory")


@pytest.mark.parametrize("fraction", [0.0001, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file(saved, fraction):
    data = saved.read_bytes()
    saved.write_bytes(data[:max(1, int(len(data) * fraction))])
    expect_rejected(saved)


def test_truncated_by_one_byte(saved):
    saved.write_bytes(saved.read_bytes()[:-1])
    expect_rejected(saved)


@pytest.mark.parametrize("prefix", [b"", b"PK\x03\x04", b"\x93NUMPY", b"\x80\x04"])
def test_random_bytes(tmp_path, prefix):
    p = tmp_path / "noise.npz"
    p.write_bytes(prefix + np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    expect_rejected(p)


def test_foreign_npz(tmp_path):
    p = tmp_path / "foreign.npz"
    np.savez(p, weights=np.ones(3), bias=np.zeros(2))
    expect_rejected(p, "__format__", "foreign")


def test_plain_npy_file(tmp_path):
    p = tmp_path / "array.npy"
    np.save(p, np.ones(3))
    expect_rejected(p, "zip")


@pytest.mark.parametrize("marker,words", [
    ("unet_np-checkpoint/2", ["version 2", "newer"]),
    ("unet_np-checkpoint/0", ["version 0"]),
    ("unet_np-checkpoint/x", ["integer version"]),
    ("some-other-format/1", ["format marker"]),
])
def test_wrong_format_marker(saved, tmp_path, marker, words):
    dst = tmp_path / "v.npz"
    rewrite(saved, dst, replace={"__format__.npy": npy_bytes(np.array(marker))})
    expect_rejected(dst, *words)


@pytest.mark.parametrize("member", ["__config__.npy", "__meta__.npy"])
@pytest.mark.parametrize("payload,word", [
    (np.frombuffer(b"{not json", dtype=np.uint8), "JSON"),
    (np.frombuffer(b"[1, 2]", dtype=np.uint8), "object"),
    (np.frombuffer(b"\xff\xfe", dtype=np.uint8), "JSON"),
    (np.ones(3), "dtype"),
])
def test_bad_json_members(saved, tmp_path, member, payload, word):
    dst = tmp_path / "j.npz"
    rewrite(saved, dst, replace={member: npy_bytes(payload)})
    expect_rejected(dst, member[:-4], word)


@pytest.mark.parametrize("member", ["__format__.npy", "__config__.npy", "__meta__.npy",
                                    "__checksum__.npy"])
def test_missing_member(saved, tmp_path, member):
    dst = tmp_path / "m.npz"
    rewrite(saved, dst, drop=(member,))
    expect_rejected(dst, member[:-4])


def test_checksum_catches_a_changed_array(saved, tmp_path):
    """The zip's CRC is rewritten to match, so only the SHA-256 can see the change."""
    w = load_checkpoint(saved).arrays["enc1.0.weight"].copy()
    w[1, 0, 2, 2] += 1e-3
    dst = tmp_path / "t.npz"
    rewrite(saved, dst, replace={"model/enc1.0.weight.npy": npy_bytes(w)})
    expect_rejected(dst, "checksum")


def test_checksum_covers_the_shape(saved, tmp_path):
    """A weight reshaped with the very same bytes (same dtype, same count) must be refused: only the
    shape in the checksum's header tells the two files apart (fails if the shape is left out)."""
    w = load_checkpoint(saved).arrays["enc1.0.weight"]
    reshaped = w.reshape(w.shape[1], w.shape[0], *w.shape[2:]) if w.shape[0] != w.shape[1] else \
        w.reshape(-1, *w.shape[2:])
    assert reshaped.shape != w.shape and reshaped.tobytes() == w.tobytes()
    dst = tmp_path / "t.npz"
    rewrite(saved, dst, replace={"model/enc1.0.weight.npy": npy_bytes(reshaped)})
    expect_rejected(dst, "checksum")


@pytest.mark.parametrize("change", ["drop_model", "add_model", "drop_optim", "meta", "dtype"])
def test_checksum_catches_other_changes(saved, tmp_path, change):
    dst = tmp_path / "t.npz"
    if change == "drop_model":
        rewrite(saved, dst, drop=("model/bytes.npy",))
    elif change == "add_model":
        rewrite(saved, dst, add={"model/extra.npy": npy_bytes(np.ones(2))})
    elif change == "drop_optim":
        rewrite(saved, dst, drop=("__optim__.npy", "optim/state.0.exp_avg.npy",
                                  "optim/state.0.step.npy", "optim/param_groups.0.lr.npy"))
    elif change == "meta":
        rewrite(saved, dst, replace={"__meta__.npy": npy_bytes(np.frombuffer(b'{"epoch": 4}', np.uint8))})
    else:  # same bytes, another dtype
        b = load_checkpoint(saved).arrays["bytes"].view(np.int8)
        rewrite(saved, dst, replace={"model/bytes.npy": npy_bytes(b)})
    expect_rejected(dst, "checksum")


def test_flipped_byte_inside_an_array(saved):
    data = bytearray(saved.read_bytes())
    w = load_checkpoint(saved).arrays["enc1.0.weight"]
    at = data.find(w.tobytes())
    assert at > 0
    data[at + 17] ^= 0x40
    saved.write_bytes(bytes(data))
    expect_rejected(saved)  # the zip CRC or the checksum, whichever looks first


def test_every_single_byte_flip_is_caught_or_harmless(saved):
    """Flip one byte at many places; the load either fails with ValueError or returns the same data
    (a flip in zip padding or an unused header field)."""
    original = saved.read_bytes()
    config, arrays, optimizer, meta = sample()
    rng = np.random.default_rng(5)
    for pos in rng.choice(len(original), size=60, replace=False):
        data = bytearray(original)
        data[pos] ^= 0xFF
        saved.write_bytes(bytes(data))
        try:
            c = load_checkpoint(saved)
        except ValueError as e:
            assert str(e).startswith("not a unet_np checkpoint"), (pos, e)
        else:
            assert c.config == config and c.meta == meta, pos
            assert_same_arrays(c.arrays, arrays)


def test_unknown_members_are_ignored(saved, tmp_path):
    dst = tmp_path / "extra.npz"
    rewrite(saved, dst, add={"notes.npy": npy_bytes(np.arange(3)), "readme.txt": b"hello"})
    c = load_checkpoint(dst)
    assert_same_arrays(c.arrays, sample()[1])


@pytest.mark.parametrize("member", ["__format__", "__config__", "model/raw"])
def test_member_that_is_not_npy(saved, tmp_path, member):
    """A zip member without the .npy suffix comes back from np.load as raw bytes."""
    dst = tmp_path / "raw.npz"
    rewrite(saved, dst, drop=(member + ".npy",), add={member: b"unet_np-checkpoint/1"})
    expect_rejected(dst, member, "not a .npy array")


def test_rejects_non_numeric_member_without_pickle(saved, tmp_path):
    """A unicode array needs no pickle, so np.load reads it; the checkpoint still refuses it."""
    dst = tmp_path / "u.npz"
    rewrite(saved, dst, replace={"model/bytes.npy": npy_bytes(np.array(["a", "b"]))})
    expect_rejected(dst, "model/bytes", "dtype")


# -- pickles are never executed ---------------------------------------------------------------------
class RunsShellWhenUnpickled:
    """Unpickling this object runs ``touch <marker>``: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = os.fspath(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def pickled_npy(marker):
    arr = np.empty(2, dtype=object)
    arr[0] = RunsShellWhenUnpickled(marker)
    arr[1] = "payload"
    return npy_bytes(arr, allow_pickle=True)


def test_payload_is_live(tmp_path):
    """Control: the crafted member really runs its command when unpickled (so the tests below,
    where it must not run, mean something)."""
    control = tmp_path / "control-marker"
    p = tmp_path / "evil.npz"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("x.npy", pickled_npy(control))
    with np.load(p, allow_pickle=True) as z:
        z["x"]
    assert control.exists()


@pytest.mark.parametrize("member", ["model/enc1.0.weight.npy", "__config__.npy", "__format__.npy",
                                    "__meta__.npy", "__checksum__.npy", "optim/state.0.step.npy",
                                    "__optim__.npy"])
def test_pickled_member_is_rejected_and_never_run(saved, tmp_path, member):
    marker = tmp_path / "PWNED"
    dst = tmp_path / "evil.npz"
    rewrite(saved, dst, replace={member: pickled_npy(marker)})
    expect_rejected(dst, "cannot be read")
    assert not marker.exists()


def test_pickled_new_model_member_is_rejected(saved, tmp_path):
    marker = tmp_path / "PWNED"
    dst = tmp_path / "evil.npz"
    rewrite(saved, dst, add={"model/injected.npy": pickled_npy(marker)})
    expect_rejected(dst, "model/injected")
    assert not marker.exists()


def test_pickled_unknown_member_is_never_read(saved, tmp_path):
    marker = tmp_path / "PWNED"
    dst = tmp_path / "evil.npz"
    rewrite(saved, dst, add={"zzz.npy": pickled_npy(marker), "aaa.npy": pickled_npy(marker)})
    c = load_checkpoint(dst)
    assert_same_arrays(c.arrays, sample()[1])
    assert not marker.exists()


def test_bare_pickle_and_object_npy_files(tmp_path):
    marker = tmp_path / "PWNED"
    import pickle
    p = tmp_path / "a.pkl"
    p.write_bytes(pickle.dumps(RunsShellWhenUnpickled(marker)))
    expect_rejected(p)
    q = tmp_path / "b.npy"
    q.write_bytes(pickled_npy(marker))
    expect_rejected(q)
    assert not marker.exists()


# -- atomicity under SIGKILL --------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(signal, "SIGKILL") or not hasattr(os, "fork"), reason="needs POSIX")
def test_sigkill_during_saves_leaves_a_or_b(tmp_path):
    """A writer process overwrites one path with checkpoints A and B (about 3.5 MB each) in a loop;
    it is killed with SIGKILL at a random moment (fixed seed for the delays), 20 times over. After
    every kill the file must load and be exactly A or exactly B. The writers are forked by one
    helper process (tests/_ckpt_writer.py) so that each starts at once."""
    path = tmp_path / "live.npz"
    expected = {w: _ckpt_writer.payload(w) for w in "AB"}
    rng = np.random.default_rng(2024)
    seen, mid_write = {"A": 0, "B": 0}, 0
    server = subprocess.Popen([sys.executable, WRITER, os.fspath(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, bufsize=1)
    live = None  # the writer's pid while it runs
    try:
        for _ in range(20):
            server.stdin.write("go\n")
            server.stdin.flush()
            word, pid = server.stdout.readline().split()
            assert word == "ready"
            live = int(pid)
            time.sleep(rng.uniform(0.0, 0.1))  # one save takes about 20 ms
            os.kill(live, signal.SIGKILL)
            assert server.stdout.readline().split() == ["ended", str(int(signal.SIGKILL))]
            live = None
            c = load_checkpoint(path)
            which = c.meta["which"]
            config, arrays, optimizer, meta = expected[which]
            assert c.config == config and c.meta == meta
            assert_same_arrays(c.arrays, arrays)
            assert_same_arrays(c.optimizer, optimizer)
            seen[which] += 1
            leftovers = temp_files(tmp_path)
            mid_write += bool(leftovers)  # killed while its temporary file existed
            for f in leftovers:           # a killed writer cannot clean up; we do
                os.unlink(tmp_path / f)
    finally:
        if live is not None:  # a failed check left a writer running: stop it
            os.kill(live, signal.SIGKILL)
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stdout.close()
    # the kills landed at various moments: both outcomes seen, and some during a write
    assert seen["A"] > 0 and seen["B"] > 0, seen
    assert mid_write > 0
