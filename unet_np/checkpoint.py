"""The checkpoint file: one ``.npz`` archive, written atomically, read without unpickling anything.

Layout (every member is a plain ``.npy`` array inside an uncompressed zip, so ``np.load`` reads it)::

    __format__      0-d unicode string  "unet_np-checkpoint/1"  (format name / version)
    __config__      1-d uint8           UTF-8 JSON text of the architecture config (a JSON object)
    __meta__        1-d uint8           UTF-8 JSON text of the metadata (epoch, step, ... a JSON object)
    __optim__       0-d bool            present only when optimizer state was saved (it may be empty)
    model/<name>    the model's arrays (state_dict order is kept)
    optim/<name>    the optimizer's arrays
    __checksum__    1-d uint8 (32)      SHA-256 over every other member, see ``_checksum``

Text is stored as bytes (uint8) rather than as an object array: object arrays need pickle, and this
format never unpickles. Only bool, integer, unsigned, float and complex dtypes are accepted.

Saving is atomic: the archive is written to a temporary file in the target's folder, flushed and
fsync'ed, then ``os.replace``-d onto the target, and the folder is fsync'ed. A reader therefore sees
either the old file or the new one, never a mixture, even if the writer is killed (SIGKILL, power
loss) at any moment. A killed writer may leave its temporary file (``.<name>.*.tmp``) behind; a
failed save that Python sees (an exception) removes it. Ctrl-C during a save (in the main thread)
is held until the file is complete, then raised: interrupted inside the zip writer, the writer was
left half-closed and printed an error when collected. Non-finite values (NaN, inf) in model or
optimizer arrays are refused before anything is written, so a diverged run never replaces a good
checkpoint with a broken one.

Loading (``np.load(path, allow_pickle=False)``) checks that the file is a zip archive, carries the
format marker with a supported version, holds valid JSON config and metadata, only numeric arrays,
and that the checksum matches. Every failure is ``ValueError("not a unet_np checkpoint: <path>:
<reason>")``; a missing file is ``FileNotFoundError``. Members with other names are ignored (never
read, so never parsed).
"""
import errno
import hashlib
import json
import contextlib
import os
import signal
import stat
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field

import numpy as np

FORMAT_NAME = "unet_np-checkpoint"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

_FORMAT_KEY = "__format__"
_CONFIG_KEY = "__config__"
_META_KEY = "__meta__"
_OPTIM_FLAG_KEY = "__optim__"
_CHECKSUM_KEY = "__checksum__"
_MODEL_PREFIX = "model/"
_OPTIM_PREFIX = "optim/"
_ALLOWED_KINDS = "biufc"  # bool, signed, unsigned, float, complex
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members / an empty zip


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns.

    config: the architecture config (a dict, as saved); arrays: model arrays, name -> ndarray, in the
    order they were saved; optimizer: optimizer arrays (dict) or None when none were saved; meta: the
    metadata dict ({} when none was given); format_version: the file's format version.
    """
    config: dict
    arrays: dict
    optimizer: dict = None
    meta: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


# -- saving ----------------------------------------------------------------------------------------
def _json_default(obj):
    """Let NumPy scalars, small arrays and dtypes appear in a config or metadata."""
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.dtype):
        return obj.name
    if isinstance(obj, type) and issubclass(obj, np.generic):
        return np.dtype(obj).name
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _json_bytes(what, value):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise TypeError(f"checkpoint {what} must be a dict, got {type(value).__name__}")
    try:
        text = json.dumps(value, default=_json_default, allow_nan=False, sort_keys=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {what} is not JSON serialisable "
                         f"(strict JSON, no NaN/inf): {e}") from None
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def _numeric_array(entry, value, require_finite):
    """``value`` as an ndarray of an accepted dtype; ValueError naming ``entry`` otherwise."""
    try:
        arr = np.asarray(value)
    except Exception as e:  # e.g. ragged sequences
        raise ValueError(f"checkpoint entry {entry!r} cannot be converted to an array: {e}") from None
    if arr.dtype.kind not in _ALLOWED_KINDS or arr.dtype.fields is not None:
        raise ValueError(f"checkpoint entry {entry!r} has dtype {arr.dtype}; only bool, integer and "
                         f"floating-point arrays can be saved")
    if require_finite and arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"checkpoint entry {entry!r} holds {bad} non-finite value(s) (NaN or inf); "
                         f"refusing to save it")
    return arr


def _section(prefix, arrays, what):
    if not hasattr(arrays, "items"):
        raise TypeError(f"checkpoint {what} must be a mapping name -> array, got {type(arrays).__name__}")
    out = []
    for name, value in arrays.items():
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ValueError(f"checkpoint {what} names must be non-empty strings, got {name!r}")
        out.append((prefix + name, _numeric_array(prefix + name, value, require_finite=True)))
    return out


def _checksum(members):
    """SHA-256 over (name, dtype, shape, bytes) of every member, in sorted name order.

    Each member contributes one JSON header line ``["name", "<f4", [shape...], nbytes]`` followed by
    its raw bytes in C order, so two different sets of arrays never hash the same stream.
    """
    h = hashlib.sha256()
    for name in sorted(members):
        arr = np.asarray(members[name])
        header = json.dumps([name, arr.dtype.str, list(arr.shape), int(arr.nbytes)])
        h.update(header.encode("utf-8") + b"\n")
        h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # C order, whatever the layout
    return h.digest()


def _write_member(zf, name, arr):
    """One ``<name>.npy`` member; ``allow_pickle=False`` so nothing pickled can ever be written."""
    with zf.open(name + ".npy", mode="w", force_zip64=True) as fh:
        np.lib.format.write_array(fh, arr, allow_pickle=False)


def _current_umask():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _fsync_dir(directory):
    """Make the rename durable. Platforms/filesystems that cannot fsync a folder are skipped."""
    if os.name == "nt":
        return
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def save_model(model, path, optimizer=None, meta=None):
    """Write a model (anything with ``arch``, ``config()`` and ``state_dict()``, as every unet_np
    model has), its optimizer's state (or None) and meta (a JSON-able dict) as one checkpoint,
    atomically. Read it back with unet_np.load_model(path). This is ``unet_np.save``; this module
    knows nothing of the models (loading, which needs the registry of architectures, is in models)."""
    save_checkpoint(path, config=dict(model.config(), arch=model.arch), arrays=model.state_dict(),
                    optimizer=optimizer.state_dict() if optimizer is not None else None,
                    meta=meta or {})


def save_checkpoint(path, config, arrays, optimizer=None, meta=None):
    """Write a checkpoint to ``path`` (exactly that name; no suffix is added) atomically.

    config: the architecture config (dict, JSON-able); arrays: model arrays, name -> array (saved as
    ``model/<name>``, order kept); optimizer: optimizer arrays, name -> array, or None; meta: dict,
    JSON-able (epoch, step, ...). Raises ValueError (naming the entry) for an object/str dtype or a
    non-finite value, before anything touches the disk; on any failure the previous file at ``path``
    is left byte-identical and the temporary file is removed.
    """
    path = os.fsdecode(os.fspath(path))
    if not isinstance(config, dict):
        raise TypeError(f"checkpoint config must be a dict, got {type(config).__name__}")
    members = [
        (_FORMAT_KEY, np.array(f"{FORMAT_NAME}/{FORMAT_VERSION}")),
        (_CONFIG_KEY, _json_bytes("config", config)),
        (_META_KEY, _json_bytes("meta", meta)),
    ]
    members += _section(_MODEL_PREFIX, arrays, "arrays")
    if optimizer is not None:
        members.append((_OPTIM_FLAG_KEY, np.array(True)))
        members += _section(_OPTIM_PREFIX, optimizer, "optimizer")
    names = [n for n, _ in members]
    if len(set(names)) != len(names):  # cannot happen with the prefixes, kept as a guard
        raise ValueError("checkpoint has duplicate entry names")
    members.append((_CHECKSUM_KEY, np.frombuffer(_checksum(dict(members)), dtype=np.uint8).copy()))

    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = 0o666 & ~_current_umask()
    with _ctrl_c_held():
        _write_atomically(path, directory, mode, members)
    _fsync_dir(directory)


@contextlib.contextmanager
def _ctrl_c_held():
    """SIGINT inside the block is held and raised as KeyboardInterrupt at its end (main thread, with
    Python's default handler installed; elsewhere nothing changes)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def _write_atomically(path, directory, mode, members):
    """The archive into a temporary file beside ``path``, fsync'ed, then os.replace'd onto it."""
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            fd = None  # the file object owns it now
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, arr in members:
                    _write_member(zf, name, arr)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename is None:    # e.g. a full disk: say which file
            if exc.errno is None:
                raise OSError(f"{path}: {exc}") from exc
            raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
        raise


# -- loading ---------------------------------------------------------------------------------------
class _Reject(Exception):
    """Internal: why a file is not a checkpoint (turned into the public ValueError)."""


def _json_member(members, key):
    arr = members[key]
    if arr.dtype == np.uint8 and arr.ndim == 1:
        raw = arr.tobytes()
    elif arr.dtype.kind == "U" and arr.ndim == 0:
        raw = str(arr[()]).encode("utf-8")
    else:
        raise _Reject(f"{key} has dtype {arr.dtype} and shape {arr.shape}, expected UTF-8 bytes")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _Reject(f"{key} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise _Reject(f"{key} is a JSON {type(value).__name__}, expected an object")
    return arr, value


def _parse_format(arr):
    if arr.ndim != 0 or arr.dtype.kind not in "US":
        raise _Reject(f"{_FORMAT_KEY} has dtype {arr.dtype} and shape {arr.shape}, expected a string")
    text = arr[()]
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    name, _, version = text.rpartition("/")
    if name != FORMAT_NAME:
        raise _Reject(f"format marker is {text[:80]!r}, expected {FORMAT_NAME!r}")
    try:
        version = int(version)
    except ValueError:
        raise _Reject(f"format marker {text[:80]!r} has no integer version") from None
    if version not in SUPPORTED_VERSIONS:
        newer = " (written by a newer unet_np?)" if version > max(SUPPORTED_VERSIONS) else ""
        raise _Reject(f"format version {version} is not supported{newer}; this unet_np reads "
                      f"version(s) {', '.join(map(str, SUPPORTED_VERSIONS))}")
    return version


def _read(path):
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise _Reject("the file is empty")
    if head not in _ZIP_MAGIC:
        raise _Reject("not a zip/npz archive")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise _Reject(f"unreadable archive (truncated or corrupt?): {type(e).__name__}: {e}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise _Reject("not an npz archive")
    with z:
        files = list(z.files)
        present = set(files)
        for key in (_FORMAT_KEY, _CONFIG_KEY, _META_KEY, _CHECKSUM_KEY):
            if key not in present:
                raise _Reject(f"member {key!r} is missing (a foreign .npz?)" if key == _FORMAT_KEY
                              else f"member {key!r} is missing")
        members = {}

        def get(key):
            try:
                arr = z[key]
            except Exception as e:  # pickled/object arrays, bad headers, CRC errors, truncation
                raise _Reject(f"member {key!r} cannot be read: {type(e).__name__}: {e}") from None
            if not isinstance(arr, np.ndarray):  # NpzFile hands back raw bytes for a non-.npy member
                raise _Reject(f"member {key!r} is not a .npy array")
            members[key] = arr
            return arr

        version = _parse_format(get(_FORMAT_KEY))
        get(_CONFIG_KEY)
        get(_META_KEY)
        config = _json_member(members, _CONFIG_KEY)[1]
        meta = _json_member(members, _META_KEY)[1]
        model, optim = {}, None
        if _OPTIM_FLAG_KEY in present:
            flag = get(_OPTIM_FLAG_KEY)
            if flag.shape != () or flag.dtype != np.bool_:
                raise _Reject(f"member {_OPTIM_FLAG_KEY!r} is not a boolean flag")
            optim = {}
        for key in files:
            if key.startswith(_MODEL_PREFIX):
                target, name = model, key[len(_MODEL_PREFIX):]
            elif key.startswith(_OPTIM_PREFIX):
                if optim is None:
                    raise _Reject(f"member {key!r} found without the {_OPTIM_FLAG_KEY!r} flag")
                target, name = optim, key[len(_OPTIM_PREFIX):]
            else:
                continue  # unknown members are ignored: never read
            arr = get(key)
            if arr.dtype.kind not in _ALLOWED_KINDS or arr.dtype.fields is not None:
                raise _Reject(f"member {key!r} has unsupported dtype {arr.dtype}")
            target[name] = arr
        stored = get(_CHECKSUM_KEY)
        if stored.dtype != np.uint8 or stored.shape != (32,):
            raise _Reject(f"member {_CHECKSUM_KEY!r} is not a SHA-256 digest")
        del members[_CHECKSUM_KEY]
        if _checksum(members) != stored.tobytes():
            raise _Reject("checksum mismatch (the file was modified or corrupted)")
    return Checkpoint(config=config, arrays=model, optimizer=optim, meta=meta, format_version=version)


def load_checkpoint(path):
    """Read a checkpoint written by ``save_checkpoint``; returns a :class:`Checkpoint`.

    Raises FileNotFoundError when ``path`` does not exist and ``ValueError("not a unet_np
    checkpoint: <path>: <reason>")`` for anything else that is wrong (empty, truncated, corrupt,
    foreign npz, unsupported version, checksum mismatch, pickled or object members). Nothing is
    ever unpickled.
    """
    path = os.fsdecode(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", path)
    if os.path.isdir(path):
        raise ValueError(f"not a unet_np checkpoint: {path}: is a directory")
    try:
        return _read(path)
    except _Reject as e:
        raise ValueError(f"not a unet_np checkpoint: {path}: {e}") from None
    except OSError as e:
        raise ValueError(f"not a unet_np checkpoint: {path}: cannot read it: {e}") from None
    except Exception as e:  # anything a malformed file could still provoke: still a ValueError
        raise ValueError(f"not a unet_np checkpoint: {path}: {type(e).__name__}: {e}") from e
