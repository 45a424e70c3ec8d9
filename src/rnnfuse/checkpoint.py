"""Checkpoints: model, optimizer, schedule, RNG state and step in one file, written atomically.

::

    save_checkpoint(path, model.state_dict(), opt.state_dict(), sched.state_dict(),
                    rng.bit_generator.state, step, extra={"epoch": 3})
    ckpt = load_checkpoint(path, expected=model.state_dict())   # plain data, checked
    ckpt = restore_checkpoint(path, model, optimizer=opt, scheduler=sched, rng=rng)

File format (version 1), little-endian::

    offset 0   magic      8 bytes   b"RNNFCKPT"
           8   version    uint32    1
          12   header_len uint64    bytes of the JSON header
          20   data_len   uint64    bytes of the array data
          28   header     JSON (UTF-8):
                          {"tree": ..., "arrays": [{"dtype", "shape", "offset", "nbytes"}, ...]}
               data       the arrays' bytes, C order, one after the other
          end  sha256     32 bytes  SHA-256 of everything before it

The tree is the saved state ``{"model", "optimizer", "scheduler", "rng", "step", "extra"}``
in a tagged JSON encoding: str, int (any size), float (NaN/inf too), bool and None as
themselves; ``{"dict": {...}}``, ``{"list": [...]}``, ``{"tuple": [...]}``;
``{"array": i}`` / ``{"scalar": i}`` for the i-th entry of "arrays" (an ndarray / a NumPy
scalar). Arrays may have any bool, integer, float or complex dtype; nothing is pickled.

Writing: everything is encoded first (bad input raises before the disk is touched), then
written to a temporary file in the target's directory, flushed, fsync'ed, renamed over the
target with ``os.replace`` and the directory fsync'ed. A failure at any point removes the
temporary file and leaves any previous checkpoint intact.

Reading checks, in order: size, magic, version, exact length (truncation), checksum
(corruption), header, and, when asked, the model state's names, shapes and dtypes. Any
failure raises ``CheckpointError`` (a ValueError) with a one-line message.
"""
from __future__ import annotations

import hashlib
import json
import numbers
import os
import secrets
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

#: What a checkpoint path may be.
PathLike = str | os.PathLike[str]

__all__ = ["FORMAT_VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "restore_checkpoint", "check_model_state"]

FORMAT_VERSION = 1
_MAGIC = b"RNNFCKPT"
_PREAMBLE = struct.Struct("<8sIQQ")   # magic, version, header_len, data_len
_DIGEST = 32
_KEYS = ("model", "optimizer", "scheduler", "rng", "step", "extra")
_ARGUMENT = {"model": "model_state", "optimizer": "optimizer_state",  # save_checkpoint's
             "scheduler": "scheduler_state", "rng": "rng_state", "step": "step",
             "extra": "extra"}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or does not match what it is loaded into."""


class Stateful(Protocol):
    """An object whose state a checkpoint saves and restores (a layer, an optimizer, a
    schedule, a data iterator)."""

    def state_dict(self) -> Any: ...
    def load_state_dict(self, state_dict: Any, /) -> Any: ...


# ---------------------------------------------------------------- encoding the tree

def _encode(obj: Any, arrays: list[NDArray[Any]], where: str) -> Any:
    """obj as tagged JSON; arrays collects the ndarrays (and NumPy scalars as 0-d arrays)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (np.ndarray, np.generic)):
        a = np.asarray(obj)
        if a.dtype.kind not in "biufc":
            raise TypeError(f"{where} must have a numeric or bool dtype to be saved, got {a.dtype}")
        arrays.append(a if a.flags.c_contiguous else a.copy(order="C"))  # keeps 0-d as 0-d
        return {"scalar" if isinstance(obj, np.generic) else "array": len(arrays) - 1}
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, float):
        return obj
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a key {k!r} of type {type(k).__name__}: "
                                "checkpoint dict keys must be str")
            out[k] = _encode(v, arrays, f"{where}[{k!r}]")
        return {"dict": out}
    if isinstance(obj, (list, tuple)):
        return {"tuple" if isinstance(obj, tuple) else "list":
                [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]}
    raise TypeError(f"{where} has type {type(obj).__name__}: a checkpoint holds only dicts, "
                    "lists, tuples, str, int, float, bool, None and NumPy arrays")


def _decode(node: Any, arrays: Sequence[NDArray[Any]]) -> Any:
    if node is None or isinstance(node, (bool, str, int, float)):
        return node
    if isinstance(node, dict) and len(node) == 1:
        (tag, v), = node.items()
        if tag == "dict" and isinstance(v, dict):
            return {k: _decode(x, arrays) for k, x in v.items()}
        if tag in ("list", "tuple") and isinstance(v, list):
            items = [_decode(x, arrays) for x in v]
            return items if tag == "list" else tuple(items)
        if tag in ("array", "scalar") and type(v) is int and 0 <= v < len(arrays):
            return arrays[v] if tag == "array" else arrays[v][()]
    raise CheckpointError(f"checkpoint header is malformed near {str(node)[:60]!r}")


# ---------------------------------------------------------------- writing

def _check_model_state(model_state: Any) -> None:
    if not isinstance(model_state, Mapping):
        raise TypeError("model_state must be a mapping of name -> np.ndarray, "
                        f"got {type(model_state).__name__}")
    for k, v in model_state.items():
        if not isinstance(k, str):
            raise TypeError(f"model_state keys must be str, got {type(k).__name__} {k!r}")
        if not isinstance(v, np.ndarray):
            raise TypeError(f"model_state[{k!r}] must be an np.ndarray, got {type(v).__name__}")


def save_checkpoint(path: PathLike, model_state: Mapping[str, NDArray[Any]],
                    optimizer_state: Any = None, scheduler_state: Any = None,
                    rng_state: Any = None, step: int = 0, extra: Any = None) -> str:
    """Write a checkpoint atomically; returns the path written.

    path : str or os.PathLike; its directory must exist. An existing file is replaced only
        once the new one is complete and on disk.
    model_state : mapping name -> np.ndarray (e.g. ``model.state_dict()``)
    optimizer_state, scheduler_state : their ``state_dict()``, or None
    rng_state : e.g. ``rng.bit_generator.state`` (a numpy Generator is also accepted and
        its state saved), or any nested data, or None
    step : int >= 0, the training step
    extra : any nested data (dicts with str keys, lists, tuples, numbers, str, arrays)
    """
    path, directory = _target(path)
    _check_model_state(model_state)
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if isinstance(rng_state, np.random.Generator):
        rng_state = rng_state.bit_generator.state
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory does not exist: {directory}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"path is a directory, not a checkpoint file: {path}")

    # 1. encode everything in memory first: bad input fails before the disk is touched
    state = {"model": dict(model_state), "optimizer": optimizer_state,
             "scheduler": scheduler_state, "rng": rng_state, "step": int(step), "extra": extra}
    preamble, header, arrays = _encode_file(state)
    # 2. temp file in the same directory, fsync, rename
    _write_atomically(path, directory, (preamble, header), arrays)
    return path


def _target(path: PathLike) -> tuple[str, str]:
    """path as a str, and the absolute directory it goes in."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return path, os.path.dirname(os.path.abspath(path))


def _encode_file(state: Mapping[str, Any]) -> tuple[bytes, bytes, list[NDArray[Any]]]:
    """The preamble, the JSON header and the arrays of a checkpoint of ``state`` (the
    ``_KEYS`` of the saved tree; ``model`` a dict of arrays, ``step`` an int)."""
    arrays: list[NDArray[Any]] = []
    tree = {}
    for key in _KEYS:
        name = _ARGUMENT[key]
        try:
            tree[key] = _encode(state[key], arrays, name)
        except RecursionError:  # a list or dict inside itself, or thousands of levels deep
            raise ValueError(f"{name} is nested too deeply or contains itself") from None
    table, offset = [], 0
    for a in arrays:
        table.append({"dtype": a.dtype.str, "shape": list(a.shape),
                      "offset": offset, "nbytes": a.nbytes})
        offset += a.nbytes
    try:
        header = json.dumps({"tree": tree, "arrays": table}, separators=(",", ":")).encode()
    except RecursionError:  # the tagged tree is twice as deep as the state
        raise ValueError("the state is nested too deeply to be saved") from None
    return _PREAMBLE.pack(_MAGIC, FORMAT_VERSION, len(header), offset), header, arrays


def _write_atomically(path: str, directory: str, head: Sequence[bytes],
                      arrays: Sequence[NDArray[Any]]) -> None:
    """Write the chunks of head, then the arrays' bytes, then the SHA-256 of all of it to a
    temporary file in ``directory`` (O_EXCL, mode from the umask), fsync it and rename it
    over ``path``; on any failure remove the temporary file and re-raise."""
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            digest = hashlib.sha256()
            for chunk in head:
                digest.update(chunk)
                f.write(chunk)
            for a in arrays:
                buf = a.reshape(-1).view(np.uint8).data if a.nbytes else b""
                digest.update(buf)
                f.write(buf)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- reading

def load_checkpoint(path: PathLike,
                    expected: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read and verify a checkpoint; returns plain data.

    path : str or os.PathLike
    expected : None, or a mapping name -> array (e.g. ``model.state_dict()``): the saved
        model state must have exactly these names, shapes and dtypes
    Returns ``{"model": {name: array}, "optimizer", "scheduler", "rng", "step": int,
    "extra", "version": int}``; arrays are fresh, writeable copies.
    Raises CheckpointError (a ValueError) for a file that is truncated, corrupted, of
    another format version or not a checkpoint, or whose model state does not match
    ``expected``; FileNotFoundError if there is no file.
    """
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}") from None
    with open(path, "rb") as f:
        blob = f.read()
    name = os.path.basename(path)
    version, header_len, data_len = _check_frame(blob, name)

    start = _PREAMBLE.size + header_len
    try:
        head = json.loads(blob[_PREAMBLE.size:start].decode())
        arrays = [_read_array(blob, start, data_len, spec) for spec in head["arrays"]]
        tree = head["tree"]
        out = {k: _decode(tree[k], arrays) for k in _KEYS}
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, OverflowError,
            RecursionError) as e:  # Overflow: int(inf); Recursion: JSON nested too deeply
        raise CheckpointError(f"{name}: checkpoint header is malformed "
                              f"({type(e).__name__}: {e})") from None
    model = out["model"]
    if (not isinstance(model, dict) or type(out["step"]) is not int
            or not all(isinstance(v, np.ndarray) for v in model.values())):
        raise CheckpointError(f"{name}: checkpoint header is malformed (model or step)")
    if expected is not None:
        check_model_state(model, expected, source=name)
    out["version"] = version
    return out


def _check_frame(blob: bytes, name: str) -> tuple[int, int, int]:
    """Size, magic, version, exact length and checksum of a checkpoint file's bytes;
    returns its version, header length and data length."""
    if len(blob) < _PREAMBLE.size:
        raise CheckpointError(f"{name}: truncated or not a checkpoint "
                              f"({len(blob)} bytes, shorter than the {_PREAMBLE.size}-byte header)")
    magic, version, header_len, data_len = _PREAMBLE.unpack_from(blob)
    if magic != _MAGIC:
        raise CheckpointError(f"{name}: not an rnnfuse checkpoint (magic {magic!r}, "
                              f"expected {_MAGIC!r})")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{name}: checkpoint format version {version} is not supported "
                              f"(this rnnfuse reads version {FORMAT_VERSION})")
    size = _PREAMBLE.size + header_len + data_len + _DIGEST
    if len(blob) < size:
        raise CheckpointError(f"{name}: truncated checkpoint ({len(blob)} bytes, "
                              f"expected {size})")
    if len(blob) > size:
        raise CheckpointError(f"{name}: corrupted checkpoint ({len(blob) - size} unexpected "
                              f"trailing bytes)")
    if hashlib.sha256(memoryview(blob)[:-_DIGEST]).digest() != blob[-_DIGEST:]:
        raise CheckpointError(f"{name}: corrupted checkpoint (SHA-256 checksum mismatch)")
    return version, header_len, data_len


def _read_array(blob: bytes, start: int, data_len: int,
                spec: Mapping[str, Any]) -> NDArray[Any]:
    dtype = np.dtype(spec["dtype"])
    shape = tuple(int(n) for n in spec["shape"])
    offset, nbytes = int(spec["offset"]), int(spec["nbytes"])
    if (dtype.kind not in "biufc" or any(n < 0 for n in shape) or offset < 0
            or offset + nbytes > data_len or nbytes != dtype.itemsize * int(np.prod(shape))):
        raise CheckpointError(f"checkpoint header is malformed (array entry {spec})")
    flat = np.frombuffer(blob, dtype=dtype, count=nbytes // dtype.itemsize, offset=start + offset)
    return flat.reshape(shape).copy()


def check_model_state(state: Mapping[str, Any], expected: Mapping[str, Any],
                      source: str = "checkpoint") -> None:
    """Raise CheckpointError unless ``state`` has exactly ``expected``'s names, shapes, dtypes.

    expected : mapping name -> array (anything with .shape and .dtype)
    The message lists every problem on one line.
    """
    if not isinstance(expected, Mapping):
        raise TypeError(f"expected must be a mapping of name -> array (e.g. model.state_dict()), "
                        f"got {type(expected).__name__}")
    problems = [f"missing {k!r}" for k in expected if k not in state]
    problems += [f"unexpected {k!r}" for k in state if k not in expected]
    for k, want in expected.items():
        if k in state:
            got = state[k]
            if tuple(got.shape) != tuple(np.shape(want)):
                problems.append(f"{k!r} shape {tuple(got.shape)}, expected {tuple(np.shape(want))}")
            if got.dtype != np.asarray(want).dtype:
                problems.append(f"{k!r} dtype {got.dtype}, expected {np.asarray(want).dtype}")
    if problems:
        raise CheckpointError(f"{source}: model state does not match ({len(problems)} "
                              f"problem(s)): " + "; ".join(problems))


def restore_checkpoint(path: PathLike, model: Stateful, optimizer: Stateful | None = None,
                       scheduler: Stateful | None = None, rng: np.random.Generator | None = None,
                       *, data_iterator: Stateful | None = None) -> dict[str, Any]:
    """Load a checkpoint and apply it to live objects, all or nothing.

    model : an object with ``state_dict()`` and ``load_state_dict(sd)`` (e.g. an rnnfuse
        layer); its saved state is checked against ``model.state_dict()`` first
    optimizer, scheduler : objects with ``state_dict()`` / ``load_state_dict()``, or None
    rng : a numpy Generator whose ``bit_generator.state`` is restored, or None
    data_iterator : an object with ``load_state_dict`` (e.g. BatchIterator) restored from
        ``extra["data"]``, or None
    Everything is validated before the model changes; if the optimizer, scheduler, rng or
    iterator refuses its state, the ones already restored are put back as they were and
    the model is not touched. Returns the loaded checkpoint (as ``load_checkpoint``).
    """
    if not (hasattr(model, "state_dict") and hasattr(model, "load_state_dict")):
        raise TypeError("model must have state_dict() and load_state_dict(), "
                        f"got {type(model).__name__}")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be None or a numpy.random.Generator, got {type(rng).__name__}")
    ckpt = load_checkpoint(path, expected=model.state_dict())
    slots: list[tuple[Stateful | None, str, Any]] = [(optimizer, "optimizer", ckpt["optimizer"]),
             (scheduler, "scheduler", ckpt["scheduler"]),
             (None if rng is None else _RngSlot(rng), "rng", ckpt["rng"])]
    if data_iterator is not None:
        extra = ckpt["extra"]
        slots.append((data_iterator, "extra['data']",
                      extra.get("data") if isinstance(extra, dict) else None))
    given = [(obj, label, value) for obj, label, value in slots if obj is not None]
    for obj, label, value in given:
        if value is None:
            raise CheckpointError(f"{os.path.basename(os.fspath(path))}: checkpoint has no "
                                  f"{label} state to restore")
    done = []
    try:
        for obj, _, value in given:
            before = obj.state_dict()
            obj.load_state_dict(value)
            done.append((obj, before))
        model.load_state_dict(ckpt["model"])
    except BaseException:
        for obj, before in reversed(done):
            obj.load_state_dict(before)
        raise
    return ckpt


class _RngSlot:
    """A numpy Generator behind the state_dict protocol."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def state_dict(self) -> Any:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: Any) -> None:
        try:
            self.rng.bit_generator.state = state
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            kind = type(self.rng.bit_generator).__name__
            raise CheckpointError(f"rng state does not fit {kind}: {e}") from None
