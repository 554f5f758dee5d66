"""Wire codec of the data store: a value becomes a msgpack header plus raw out-of-band buffers.

`encode` turns a value into frames: frames[0] is the msgpack header, frames[1:] are the bytes of every numpy
array and CPU torch tensor in the value, in the order the header refers to them. Arrays are not copied on
encode (frames are views of their memory) nor on decode (arrays are rebuilt over the given buffers).
`pack`/`unpack` join the frames into one blob, for the places that need a single buffer.

Buffers carry native byte order; every host AsyncFlow runs on is little-endian.

This module knows nothing about partitions, schemas, storage or transport, and it never imports torch on
its own: a tensor can only exist once the caller imported torch, and decoding a tensor imports it then.
There is no pickle here: only the types listed in `encode` cross the wire, so decoding runs no code.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import reprlib
import struct
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from dataplane.errors import CodecError

__all__ = ["array_from", "array_meta", "decode", "encode", "pack", "unpack"]

_TAG = "afc1"  # first element of every header: tells a codec header from any other msgpack
_EXT_ARRAY = 1  # payload: [buffer index, dtype name, shape, kind]
_EXT_TUPLE = 2  # payload: msgpack list of the items (msgpack itself has only lists)
_EXT_SCALAR = 3  # payload: [dtype name, raw bytes]; numpy scalars are small, so they travel inline

_NUMPY_NAMES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
)  # fmt: skip
_NP_DTYPES = {name: np.dtype(name) for name in _NUMPY_NAMES}
# Keyed by dtype.char because dtype.name is computed in Python (~1.5 us); 'l' and 'q' both mean int64 here.
_NAME_BY_CHAR = {
    np.dtype(c).char: np.dtype(c).name for c in np.typecodes["All"] if np.dtype(c).name in _NP_DTYPES
}

# Torch dtypes numpy lacks travel as unsigned ints of the same width and are viewed back on decode.
_TORCH_ONLY = {
    "bfloat16": "uint16",
    "complex32": "uint32",
    "float8_e4m3fn": "uint8",
    "float8_e4m3fnuz": "uint8",
    "float8_e5m2": "uint8",
    "float8_e5m2fnuz": "uint8",
    "float8_e8m0fnu": "uint8",
    "float4_e2m1fn_x2": "uint8",
}
_KINDS = ("numpy", "torch")
_CONTAINERS = frozenset({dict, list, tuple})
_EMPTY = memoryview(b"")
_PREFIX = struct.Struct("<4sI")  # blob magic, frame count; then one uint64 length per frame
_BLOB_MAGIC = b"AFC1"
_ALIGN = 8  # every frame in a blob starts 8-aligned, so rebuilt arrays are aligned for their dtype
# Reused across calls: a payload holds only ints, str and lists, so packing it runs no Python code and
# cannot interleave with another thread's.
_payload = msgpack.Packer(use_bin_type=True).pack


# --- arrays -------------------------------------------------------------------------------------------


def array_meta(value: Any) -> tuple[str, tuple[int, ...], str, memoryview]:
    """Return (dtype name, shape, kind "numpy"|"torch", contiguous byte view) of an array or CPU tensor.

    The view aliases the array's memory; only non-contiguous, big-endian or lazily conjugated inputs are
    copied first, because raw bytes must be one contiguous native run.
    """
    if isinstance(value, np.ndarray):
        return _numpy_meta(value)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return _torch_meta(value, torch)
    raise CodecError(
        f"array_meta expects a numpy array or a CPU torch tensor, got {_type_name(value)}; "
        "convert it with np.asarray(value) first"
    )


def _numpy_meta(arr: np.ndarray) -> tuple[str, tuple[int, ...], str, memoryview]:
    name, arr = _native(arr)
    return name, arr.shape, "numpy", _byte_view(arr)


def _native(arr: np.ndarray) -> tuple[str, np.ndarray]:
    """Check the dtype and return (name, a C-contiguous native-order array)."""
    if type(arr) is not np.ndarray:
        if isinstance(arr, np.ma.MaskedArray):
            raise CodecError(
                "numpy masked arrays are not supported: the mask would be lost; "
                "send arr.filled(fill_value) and the mask (arr.mask) as two arrays"
            )
        arr = arr.view(np.ndarray)  # memmap, matrix, ...: same memory, plain array
    dt = arr.dtype
    name = _NAME_BY_CHAR.get(dt.char)
    if name is None:
        raise _dtype_error(dt)
    if not dt.isnative:
        arr = arr.astype(dt.newbyteorder("="))  # copy: the wire carries native byte order
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)  # copy: a frame is one contiguous run of bytes
    return name, arr


def _byte_view(arr: np.ndarray) -> memoryview:
    # A buffer with a zero in its shape cannot be cast, and it has no memory to alias anyway.
    return arr.data.cast("B") if arr.size else _EMPTY


def _torch_meta(t: Any, torch: Any) -> tuple[str, tuple[int, ...], str, memoryview]:
    if not t.is_cpu:
        raise CodecError(
            f"torch tensor on device '{t.device}' cannot be encoded: only CPU tensors are supported; "
            "call .cpu() first"
        )
    if t.layout is not torch.strided:
        raise CodecError(f"torch tensor with layout {t.layout} is not supported; call .to_dense() first")
    name = _torch_tables()[0].get(t.dtype)
    if name is None:
        raise CodecError(
            f"torch tensor of dtype {t.dtype} is not supported: supported dtypes are "
            f"{', '.join(_NUMPY_NAMES + tuple(_TORCH_ONLY))}; convert it with .to(torch.float32) or similar"
        )
    if t.requires_grad:
        t = t.detach()  # the wire carries values, never autograd history
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()  # copy: these lazy views have no raw bytes of their own
    carrier = _TORCH_ONLY.get(name)
    if carrier is not None:
        t = t.contiguous().view(getattr(torch, carrier))  # numpy cannot hold the dtype, its bits can
    _, arr = _native(t.numpy())  # .numpy() shares memory; _native copies only if non-contiguous
    return name, arr.shape, "torch", _byte_view(arr)


@functools.cache
def _torch_tables() -> tuple[dict[Any, str], dict[str, Any]]:
    """(torch dtype -> wire name, wire name -> torch dtype) for the dtypes this torch build has."""
    import torch

    by_name = {n: getattr(torch, n) for n in _NUMPY_NAMES + tuple(_TORCH_ONLY) if hasattr(torch, n)}
    return {dt: n for n, dt in by_name.items()}, by_name


def array_from(buf: Any, dtype: str, shape: Sequence[int], kind: str) -> Any:
    """Rebuild an array (kind "numpy") or tensor (kind "torch") over `buf` without copying it.

    A read-only buffer gives a read-only numpy array; torch has no read-only tensors, so a tensor over a
    read-only buffer must not be written in place (clone it first).
    """
    np_dtype = _wire_dtype(dtype, kind)
    shape = _check_shape(shape)
    view = _as_view(buf)
    expected = math.prod(shape) * np_dtype.itemsize
    if view.nbytes != expected:
        raise CodecError(
            f"buffer of {view.nbytes} bytes does not match dtype {dtype} and shape {shape} "
            f"({expected} bytes expected); the frames are truncated or out of order"
        )
    try:
        arr = np.frombuffer(view, np_dtype).reshape(shape)
    except ValueError as exc:
        raise CodecError(f"cannot rebuild a {dtype} array of shape {shape}: {exc}") from exc
    return arr if kind == "numpy" else _tensor_from(arr, dtype)


def _wire_dtype(dtype: Any, kind: Any) -> np.dtype:
    if kind not in _KINDS:
        raise CodecError(f"array kind {kind!r} is unknown: expected 'numpy' or 'torch'")
    np_dtype = _NP_DTYPES.get(dtype) if type(dtype) is str else None
    if np_dtype is None and kind == "torch" and type(dtype) is str and dtype in _TORCH_ONLY:
        np_dtype = _NP_DTYPES[_TORCH_ONLY[dtype]]
    if np_dtype is None:
        raise CodecError(
            f"dtype {dtype!r} is not supported for kind {kind!r}: supported dtypes are "
            f"{', '.join(_NUMPY_NAMES)} (plus {', '.join(_TORCH_ONLY)} for torch)"
        )
    return np_dtype


def _check_shape(shape: Any) -> tuple[int, ...]:
    try:
        dims = tuple(map(operator.index, shape)) if type(shape) in (list, tuple) else None
    except TypeError:
        dims = None
    if dims is None or (dims and min(dims) < 0):
        raise CodecError(f"shape {reprlib.repr(shape)} is invalid: expected a list of non-negative ints")
    return dims


def _as_view(buf: Any) -> memoryview:
    try:
        view = buf if type(buf) is memoryview else memoryview(buf)
    except TypeError as exc:
        raise CodecError(f"expected a bytes-like buffer, got {_type_name(buf)}") from exc
    if not view.c_contiguous:
        raise CodecError("buffer is not C-contiguous; pass a contiguous bytes-like object")
    return view


def _tensor_from(arr: np.ndarray, dtype: str) -> Any:
    import torch

    if arr.flags.writeable:
        t = torch.from_numpy(arr)
    else:
        # torch cannot mark a tensor read-only and warns; the aliasing is the point here (see array_from),
        # so silence exactly that warning, only around this call.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="The given NumPy array is not writable", category=UserWarning
            )
            t = torch.from_numpy(arr)
    return t if dtype not in _TORCH_ONLY else t.view(_torch_tables()[1][dtype])


# --- encode -------------------------------------------------------------------------------------------


def encode(value: Any) -> list[bytes | memoryview]:
    """Encode `value` into [msgpack header, raw buffer, ...]; array buffers are views, not copies.

    Supported: None, bool, int (64-bit), float, str, bytes/bytearray/memoryview (decoded as bytes), list,
    tuple, dict with str or int keys, numpy arrays and scalars of bool/int/uint/float/complex dtypes, CPU
    torch tensors (bfloat16 and float8 included), nested in any combination. Anything else: CodecError.
    """
    if type(value) in _CONTAINERS:
        _guard(_check_keys, value)
    encoder = _Encoder()
    header = _guard(_packb, [_TAG, value], encoder.default)
    return [header, *encoder.buffers]


def _packb(value: Any, default: Any) -> bytes:
    # strict_types sends tuples and subclasses (np.float64 is a float) to `default` instead of packing
    # them as their base type, so they keep their type across the wire.
    return msgpack.packb(value, default=default, use_bin_type=True, strict_types=True)


def _guard(fn: Any, *args: Any) -> Any:
    """Run `fn`, turning msgpack's and Python's refusals into CodecError."""
    try:
        return fn(*args)
    except OverflowError as exc:
        raise _int_range_error() from exc
    except UnicodeEncodeError as exc:
        raise CodecError(f"str is not valid UTF-8 ({exc.reason}); remove lone surrogates first") from exc
    except (ValueError, BufferError, RecursionError) as exc:
        raise CodecError(
            f"value cannot be encoded ({exc}): it is nested too deeply or self-referencing, or holds "
            "a str/bytes over 4 GiB; flatten it or split it"
        ) from exc


def _check_keys(obj: Any) -> None:
    """Refuse dict keys other than str and int; msgpack itself would accept any key silently."""
    if type(obj) is dict:
        for key, item in obj.items():
            if type(key) is not str and type(key) is not int:
                raise CodecError(
                    f"dict key {reprlib.repr(key)} of type {_type_name(key)} is not supported: keys must be "
                    "str or int; convert the key, e.g. str(key)"
                )
            if type(item) in _CONTAINERS:
                _check_keys(item)
    elif not _CONTAINERS.isdisjoint(map(type, obj)):  # scans long lists of scalars at C speed
        for item in obj:
            if type(item) in _CONTAINERS:
                _check_keys(item)


class _Encoder:
    """msgpack `default` hook for one encode call; collects the out-of-band buffers."""

    __slots__ = ("buffers",)

    def __init__(self) -> None:
        self.buffers: list[memoryview] = []

    def default(self, obj: Any) -> msgpack.ExtType:
        if isinstance(obj, np.ndarray) or _is_tensor(obj):
            name, shape, kind, view = array_meta(obj)
            self.buffers.append(view)
            return _ext(_EXT_ARRAY, _payload((len(self.buffers) - 1, name, shape, kind)))
        if isinstance(obj, np.generic):
            return _ext(_EXT_SCALAR, _payload(_scalar_parts(obj)))
        if type(obj) is tuple:
            return _ext(_EXT_TUPLE, _packb(list(obj), self.default))
        if type(obj) is int:  # msgpack hands over the ints it cannot hold
            raise _int_range_error()
        raise _unsupported(obj)


def _ext(code: int, data: bytes) -> msgpack.ExtType:
    # ExtType.__new__ re-checks code and data in Python (~0.3 us, a fifth of an array's encode cost);
    # ours are valid by construction, so build the namedtuple directly.
    return tuple.__new__(msgpack.ExtType, (code, data))


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _scalar_parts(obj: np.generic) -> tuple[str, bytes]:
    name = _NAME_BY_CHAR.get(obj.dtype.char)
    if name is None:
        raise CodecError(
            f"numpy scalar of type {_type_name(obj)} is not supported: supported are numpy scalars of "
            f"{', '.join(_NUMPY_NAMES)}; convert it with .item()"
        )
    return name, obj.tobytes()


def _int_range_error() -> CodecError:
    return CodecError(
        "int out of range: integers must lie in [-2**63, 2**64 - 1]; send larger ones as str(x)"
    )


def _dtype_error(dt: np.dtype) -> CodecError:
    if dt.names is not None:
        fix = "send each field as its own array: {name: arr[name] for name in arr.dtype.names}"
        what = f"structured dtype {dt}"
    elif dt.kind == "O":
        fix = "object arrays hold Python objects, not raw numbers: use arr.astype(<numeric dtype>) or a list"
        what = "object dtype"
    else:
        fix = "convert it, e.g. arr.astype(np.float32), or send text as str values"
        what = f"dtype {dt}"
    return CodecError(
        f"numpy array of {what} is not supported: supported dtypes are {', '.join(_NUMPY_NAMES)}; {fix}"
    )


def _unsupported(obj: Any) -> CodecError:
    if isinstance(obj, (set, frozenset)):
        fix = "send sorted(x) or list(x)"
    elif dataclasses.is_dataclass(obj):
        fix = "send dataclasses.asdict(x)"
    elif isinstance(obj, (int, float, str, bytes, list, dict)):
        base = next(b for b in (bool, int, float, str, bytes, list, dict) if isinstance(obj, b))
        fix = f"subclasses keep no type on the wire: send {base.__name__}(x)"
    else:
        fix = "convert it to those types first (e.g. a dict of its fields)"
    return CodecError(
        f"cannot encode a value of type {_type_name(obj)}: supported are None, bool, int, float, str, bytes, "
        "list, tuple, dict (str or int keys), numpy arrays/scalars of numeric or bool dtype and CPU torch "
        f"tensors; {fix}"
    )


def _type_name(obj: Any) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


# --- decode -------------------------------------------------------------------------------------------


def decode(frames: Sequence[bytes | bytearray | memoryview]) -> Any:
    """Rebuild the value `encode` produced; arrays and tensors are views of the buffer frames."""
    if not isinstance(frames, Sequence) or isinstance(frames, (bytes, bytearray, str)) or not frames:
        raise CodecError(f"decode expects a non-empty sequence of frames, got {_type_name(frames)}")
    decoder = _Decoder(frames)
    top = decoder.unpackb(frames[0])
    if type(top) is not list or len(top) != 2 or type(top[0]) is not str or top[0] != _TAG:
        raise CodecError(f"frame 0 is not a codec header (no {_TAG!r} tag); it was not made by encode()")
    if len(decoder.seen) != len(frames) - 1:
        raise CodecError(
            f"header refers to {len(decoder.seen)} buffer frames but {len(frames) - 1} were given; "
            "pass exactly the frames encode() returned"
        )
    return top[1]


class _Decoder:
    """msgpack `ext_hook` for one decode call; resolves array references against the frames."""

    __slots__ = ("frames", "seen")

    def __init__(self, frames: Sequence[Any]) -> None:
        self.frames = frames
        self.seen: set[int] = set()

    def unpackb(self, data: Any) -> Any:
        try:
            return msgpack.unpackb(data, ext_hook=self.ext_hook, raw=False, strict_map_key=False)
        except CodecError:
            raise
        except (ValueError, TypeError, BufferError, RecursionError, msgpack.UnpackException) as exc:
            raise CodecError(f"header is not valid msgpack: {exc}") from exc

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == _EXT_ARRAY:
            index, dtype, shape, kind = _fields(data, 4)
            return array_from(self.frames[self._claim(index)], dtype, shape, kind)
        if code == _EXT_TUPLE:
            items = self.unpackb(data)
            if type(items) is not list:
                raise CodecError("tuple payload is not a list; the header is corrupt")
            return tuple(items)
        if code == _EXT_SCALAR:
            return _scalar_from(*_fields(data, 2))
        raise CodecError(f"unknown ext type code {code} in header; it was not made by this codec")

    def _claim(self, index: Any) -> int:
        count = len(self.frames) - 1
        if type(index) is not int or not 0 <= index < count or index in self.seen:
            raise CodecError(
                f"header refers to buffer frame {index!r}, but {count} buffer frames were given "
                f"(or it was referenced twice); pass exactly the frames encode() returned"
            )
        self.seen.add(index)
        return index + 1


def _fields(data: bytes, n: int) -> list[Any]:
    try:
        fields = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CodecError(f"ext payload is not valid msgpack: {exc}") from exc
    if type(fields) is not list or len(fields) != n:
        raise CodecError(f"ext payload should be a list of {n} fields, got {reprlib.repr(fields)}")
    return fields


def _scalar_from(dtype: Any, raw: Any) -> np.generic:
    np_dtype = _wire_dtype(dtype, "numpy")
    if type(raw) is not bytes or len(raw) != np_dtype.itemsize:
        raise CodecError(
            f"numpy scalar of dtype {dtype} needs {np_dtype.itemsize} bytes, got {reprlib.repr(raw)}"
        )
    return np.frombuffer(raw, np_dtype)[0]


# --- single blob --------------------------------------------------------------------------------------


def pack(value: Any) -> bytes:
    """Encode `value` into one blob: magic, frame count, frame lengths, then the frames 8-aligned."""
    frames = encode(value)
    lengths = [len(f) for f in frames]  # every frame is a byte view, so len is its size in bytes
    parts: list[bytes | memoryview] = [
        _PREFIX.pack(_BLOB_MAGIC, len(frames)),
        struct.pack(f"<{len(frames)}Q", *lengths),
    ]
    for frame, length in zip(frames, lengths, strict=True):
        parts.append(frame)
        if length % _ALIGN:
            parts.append(bytes(-length % _ALIGN))
    return b"".join(parts)


def unpack(blob: bytes | bytearray | memoryview) -> Any:
    """Decode a `pack` blob; arrays are views into `blob`, never copies."""
    view = _as_view(blob)
    if view.format != "B" or view.ndim != 1:
        try:
            view = view.cast("B")
        except TypeError as exc:
            raise CodecError(f"blob cannot be read as bytes: {exc}") from exc
    if view.nbytes < _PREFIX.size or bytes(view[:4]) != _BLOB_MAGIC:
        raise CodecError("blob does not start with the codec magic b'AFC1'; it was not made by pack()")
    _, count = _PREFIX.unpack_from(view)
    offset = _PREFIX.size + 8 * count
    if count == 0 or offset > view.nbytes:
        raise CodecError(f"blob of {view.nbytes} bytes cannot hold {count} frame lengths; it is truncated")
    frames = []
    for length in struct.unpack_from(f"<{count}Q", view, _PREFIX.size):
        if offset + length > view.nbytes:
            raise CodecError(
                f"blob of {view.nbytes} bytes is truncated: a frame ends at byte {offset + length}"
            )
        frames.append(view[offset : offset + length])
        offset += length + (-length % _ALIGN)
    if offset != view.nbytes:
        raise CodecError(f"blob has {view.nbytes} bytes but its frames account for {offset}; it is corrupt")
    return decode(frames)
