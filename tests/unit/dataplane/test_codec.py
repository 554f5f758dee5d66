"""Tests of the data store's wire codec: round trips, zero copy, refusals and malformed input."""

from __future__ import annotations

import dataclasses
import enum
import struct
import warnings
from collections import OrderedDict
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from asyncflow.errors import CodecError
from dataplane.codec import array_from, array_meta, decode, encode, pack, unpack

FAST = settings(max_examples=100, deadline=None)

NUMERIC_DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="="),
    hnp.unsigned_integer_dtypes(endianness="="),
    hnp.floating_dtypes(sizes=(16, 32, 64), endianness="="),
    hnp.complex_number_dtypes(sizes=(64, 128), endianness="="),
)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
ARRAYS = hnp.arrays(NUMERIC_DTYPES, SHAPES)
SMALL_ARRAYS = hnp.arrays(NUMERIC_DTYPES, hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3))
NP_SCALARS = hnp.arrays(NUMERIC_DTYPES, ()).map(lambda a: a[()])
INTS = st.integers(-(2**63), 2**64 - 1)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
    SMALL_ARRAYS,
    NP_SCALARS,
    SMALL_ARRAYS.map(torch.from_numpy),
)
NESTED = st.recursive(
    LEAVES,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=5) | INTS, kids, max_size=4),
    ),
    max_leaves=12,
)

TORCH_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
    torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
    torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2,
]  # fmt: skip


def tensor_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""  # an empty tensor may have zero strides, which .view(uint8) refuses
    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def assert_same(expected: Any, actual: Any) -> None:
    """Exact equality: same types, dtypes, shapes and bits (so NaN equals NaN and -0.0 is not 0.0)."""
    if isinstance(expected, torch.Tensor):
        assert type(actual) is torch.Tensor and not actual.requires_grad
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape)
        assert tensor_bytes(actual) == tensor_bytes(expected)
    elif isinstance(expected, np.ndarray):
        native = expected.dtype.newbyteorder("=")
        assert type(actual) is np.ndarray and (actual.dtype, actual.shape) == (native, expected.shape)
        assert actual.tobytes() == np.ascontiguousarray(expected, native).tobytes()
    elif isinstance(expected, np.generic):
        assert type(actual) is type(expected) and actual.tobytes() == expected.tobytes()
    elif type(expected) is float:
        assert type(actual) is float and struct.pack("<d", actual) == struct.pack("<d", expected)
    elif type(expected) in (list, tuple):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for e, a in zip(expected, actual, strict=True):
            assert_same(e, a)
    elif type(expected) is dict:
        assert type(actual) is dict and list(actual) == list(expected)
        for key in expected:
            assert_same(expected[key], actual[key])
    else:
        assert type(actual) is type(expected) and actual == expected


def round_trip(value: Any) -> None:
    assert_same(value, decode(encode(value)))
    assert_same(value, unpack(pack(value)))


def address(buf: Any) -> int:
    return np.frombuffer(buf, np.uint8).__array_interface__["data"][0]


# --- round trips ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, float("nan"), float("-inf"), -0.0,
        "", "héllo ✓", b"", b"\x00\xff", [], {}, (), (1,), ((),), {1: "a", "b": (2, [3.0])}, [[[]]],
    ],
)  # fmt: skip
def test_plain_values_round_trip(value: Any) -> None:
    round_trip(value)


def test_bytes_like_values_come_back_as_bytes() -> None:
    assert decode(encode([bytearray(b"ab"), memoryview(b"cd")])) == [b"ab", b"cd"]


def test_ragged_rows_are_a_list_of_arrays() -> None:
    round_trip({"response_ids": [np.arange(n, dtype=np.int64) for n in (0, 3, 7)], "reward": np.float32(1.0)})


@FAST
@given(ARRAYS)
def test_arrays_round_trip(arr: np.ndarray) -> None:
    round_trip(arr)
    round_trip({"x": arr, "y": [arr, arr]})


@FAST
@given(hnp.arrays(st.sampled_from([">i2", ">u4", ">f8", ">c8", "<f4"]), hnp.array_shapes(max_dims=3)))
def test_big_endian_and_strided_arrays_round_trip(arr: np.ndarray) -> None:
    round_trip(arr)
    round_trip(arr[::2])
    round_trip(arr.T)


@FAST
@given(NP_SCALARS)
def test_numpy_scalars_round_trip_as_numpy_scalars(scalar: np.generic) -> None:
    round_trip(scalar)


@FAST
@given(NESTED)
def test_nested_values_round_trip(value: Any) -> None:
    round_trip(value)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 0, 3), (2, 3, 4)], ids=str)
def test_tensors_round_trip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape).to(dtype)
    round_trip(t)
    round_trip({"t": t, "pair": (t, t)})


@FAST
@given(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3), elements=st.floats(-100, 100, width=32)),
    st.sampled_from(TORCH_DTYPES),
)
def test_non_contiguous_tensors_round_trip(arr: np.ndarray, dtype: torch.dtype) -> None:
    t = torch.from_numpy(arr).to(dtype)
    round_trip(t.transpose(0, 1))
    round_trip(t[::2])


def test_tensor_views_and_autograd_round_trip_as_plain_values() -> None:
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    round_trip(base.requires_grad_())
    round_trip(torch.nn.Parameter(torch.ones(3)))
    round_trip(torch.ones(3, 1).expand(3, 4))
    round_trip(torch.tensor([1 + 2j, 3 - 4j]).conj())
    round_trip(torch.ones(2, 3, dtype=torch.bfloat16).T)


def test_complex32_tensors_round_trip() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "ComplexHalf support is experimental"
        t = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).to(torch.complex32)
        out = decode(encode(t))
    assert out.dtype == torch.complex32 and tensor_bytes(out) == tensor_bytes(t)


def test_encode_does_not_import_torch_for_numpy_values() -> None:
    frames = encode({"a": np.zeros(2)})
    assert type(decode(frames)["a"]) is np.ndarray


# --- zero copy -----------------------------------------------------------------------------------------


def test_encoded_frames_alias_the_arrays() -> None:
    arr = np.arange(10, dtype=np.int64)
    part = arr[2:8]  # contiguous, with an offset
    t = torch.arange(12, dtype=torch.bfloat16)
    header, *buffers = encode({"a": arr, "p": part, "t": t, "s": np.float32(1)})
    assert isinstance(header, bytes) and len(buffers) == 3
    assert address(buffers[0]) == arr.__array_interface__["data"][0]
    assert np.shares_memory(np.frombuffer(buffers[0], np.int64), arr)
    assert address(buffers[1]) == part.__array_interface__["data"][0]
    assert address(buffers[2]) == t.data_ptr()


def test_copied_inputs_are_only_the_documented_ones() -> None:
    arr = np.arange(10, dtype=np.int64)
    strided, swapped = arr[::2], arr.astype(">i8")
    for value in (strided, swapped):
        frame = encode(value)[1]
        assert not np.shares_memory(np.frombuffer(frame, np.uint8), arr)
        assert_same(value, decode([encode(value)[0], frame]))


def test_array_meta_returns_a_byte_view_of_the_array() -> None:
    arr = np.ones((2, 3), np.float16)
    name, shape, kind, view = array_meta(arr)
    assert (name, shape, kind, view.format, view.nbytes) == ("float16", (2, 3), "numpy", "B", 12)
    assert address(view) == arr.__array_interface__["data"][0]
    assert array_meta(torch.zeros(4, dtype=torch.bfloat16))[:3] == ("bfloat16", (4,), "torch")


@pytest.mark.parametrize("make_buffer", [bytes, bytearray], ids=["bytes", "bytearray"])
def test_decoded_arrays_are_views_of_the_frames(make_buffer: Any) -> None:
    header, buf = encode(np.arange(8, dtype=np.float32))
    buf = make_buffer(buf)
    out = decode([header, buf])
    assert np.shares_memory(out, np.frombuffer(buf, np.uint8))
    assert out.flags.writeable == isinstance(buf, bytearray)


def test_decoded_array_over_a_writable_buffer_writes_through() -> None:
    header, buf = encode(np.zeros(4, np.int32))
    buf = bytearray(buf)
    decode([header, buf])[1] = 7
    assert np.frombuffer(buf, np.int32).tolist() == [0, 7, 0, 0]


@pytest.mark.parametrize("dtype", [torch.int64, torch.bfloat16, torch.bool], ids=str)
def test_decoded_tensors_are_views_without_warnings(dtype: torch.dtype) -> None:
    header, buf = encode(torch.ones(6, dtype=dtype))
    buf = bytes(buf)  # read-only: torch would warn about it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode([header, buf])
    assert type(out) is torch.Tensor and out.dtype == dtype
    assert out.data_ptr() == address(buf)


def test_unpacked_arrays_are_aligned_views_into_the_blob() -> None:
    value = {"a": np.arange(3, dtype=np.int8), "b": np.arange(5, dtype=np.complex128), "t": torch.ones(3)}
    blob = pack(value)
    out = unpack(blob)
    start, end = address(blob), address(blob) + len(blob)
    for arr in (out["a"], out["b"], out["t"].numpy()):
        pointer = arr.__array_interface__["data"][0]
        assert start <= pointer < end and (pointer - start) % 8 == 0
    assert_same(value, unpack(memoryview(blob)))
    assert_same(value, unpack(bytearray(blob)))


# --- refusals ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Point:
    x: int


class Color(enum.IntEnum):
    RED = 1


def self_referencing() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    ("value", "names"),
    [
        (np.array([1, "a"], dtype=object), "object dtype"),
        (np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]), "structured dtype"),
        (np.array(["text"]), "<U4"),
        (np.zeros(2, "datetime64[s]"), "datetime64"),
        (np.zeros(2, np.longdouble), "float128"),
        (np.ma.masked_array([1, 2], mask=[0, 1]), "masked"),
        (np.str_("a"), "numpy.str_"),
        ({1, 2}, "set"),
        (frozenset({1}), "frozenset"),
        (object(), "type object"),
        (Point(1), "Point"),
        (OrderedDict(a=1), "OrderedDict"),
        (Color.RED, "Color"),
        (len, "builtin_function_or_method"),
        ({1.5: 1}, "type float"),
        ({(1, 2): 1}, "type tuple"),
        ({None: 1}, "type NoneType"),
        ({b"k": 1}, "type bytes"),
        ({True: 1}, "type bool"),
        ([{"a": ({2.0: 1},)}], "type float"),
        ([1, {2}], "set"),
        (2**64, "int out of range"),
        (-(2**63) - 1, "int out of range"),
        ({"big": [2**70]}, "int out of range"),
        ("\ud800", "UTF-8"),
        (self_referencing(), "self-referencing"),
        (torch.empty(2, device="meta"), "device 'meta'"),
        (torch.zeros(2, 2).to_sparse(), "to_dense"),
        (torch.empty(2, dtype=torch.bits8), "torch.bits8"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,  # repr of some refused values raises
)
def test_unsupported_values_are_refused_with_a_helpful_message(value: Any, names: str) -> None:
    with pytest.raises(CodecError, match="supported|out of range|UTF-8|self-referencing") as info:
        encode(value)
    assert names in str(info.value)
    with pytest.raises(CodecError):
        pack(value)


def test_refusals_say_how_to_fix() -> None:
    cases = [(np.zeros(2, object), "astype"), ({1}, "list(x)"), (Point(1), "asdict"), ({1.5: 0}, "str(key)")]
    for value, fix in cases:
        with pytest.raises(CodecError, match=fix.replace("(", r"\(").replace(")", r"\)")):
            encode(value)


def test_device_tensors_are_refused_with_cpu_hint() -> None:
    with pytest.raises(CodecError, match=r"call \.cpu\(\) first"):
        encode({"t": torch.empty(1, device="meta")})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_refused() -> None:
    with pytest.raises(CodecError, match=r"cuda.*\.cpu\(\)"):
        encode(torch.ones(2, device="cuda"))


def test_array_meta_refuses_non_arrays() -> None:
    with pytest.raises(CodecError, match="got list"):
        array_meta([1, 2])


# --- malformed input -----------------------------------------------------------------------------------


def header(value: Any) -> bytes:
    return msgpack.packb(["afc1", value], use_bin_type=True)


def array_ext(index: Any, dtype: Any = "int64", shape: Any = (2,), kind: Any = "numpy") -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb([index, dtype, shape, kind]))


BUF16 = bytes(16)


@pytest.mark.parametrize(
    "frames",
    [
        [],
        b"not frames",
        [123],
        [b""],
        [b"\xc1"],
        [msgpack.packb(1)],
        [msgpack.packb(["afc1"])],
        [msgpack.packb(["nope", 1])],
        [msgpack.packb([array_ext(0), 1]), BUF16],
        [header([1, 2])[:-1]],
        [header(1) + b"\x00"],
        [header(array_ext(0))],
        [header(array_ext(0)), BUF16, BUF16],
        [header(array_ext(1)), BUF16],
        [header(array_ext(-1)), BUF16],
        [header(array_ext("0")), BUF16],
        [header([array_ext(0), array_ext(0)]), BUF16, BUF16],
        [header(array_ext(0)), BUF16[:15]],
        [header(array_ext(0, shape=(3,))), BUF16],
        [header(array_ext(0, shape=(-2, -1))), BUF16],
        [header(array_ext(0, shape="ab")), BUF16],
        [header(array_ext(0, shape=[1] * 70)), bytes(8)],
        [header(array_ext(0, dtype="object")), BUF16],
        [header(array_ext(0, dtype=["int64"])), BUF16],
        [header(array_ext(0, dtype="bfloat16", shape=(8,))), BUF16],
        [header(array_ext(0, kind="jax")), BUF16],
        [header(array_ext(0)), 12345],
        [header(array_ext(0)), memoryview(bytes(32))[::2]],
        [header(msgpack.ExtType(1, b"\xc1"))],
        [header(msgpack.ExtType(1, msgpack.packb([0, "int64"])))],
        [header(msgpack.ExtType(2, msgpack.packb(5)))],
        [header(msgpack.ExtType(3, msgpack.packb(["int64", b"\x00"])))],
        [header(msgpack.ExtType(3, msgpack.packb(["str", b"\x00"])))],
        [header(msgpack.ExtType(99, b""))],
        [header({(1,): 2})[:-2]],
    ],
    ids=lambda f: repr(f)[:60],
)
def test_malformed_frames_raise_codec_error(frames: Any) -> None:
    with pytest.raises(CodecError):
        decode(frames)


def test_array_from_checks_its_arguments() -> None:
    assert array_from(BUF16, "int64", [2], "numpy").tolist() == [0, 0]
    for args in [
        ("int64", (3,), "numpy"),
        ("int64", (2,), "cupy"),
        ("bfloat16", (8,), "numpy"),
        ("x", (), "numpy"),
    ]:
        with pytest.raises(CodecError):
            array_from(BUF16, *args)
    with pytest.raises(CodecError, match="bytes-like"):
        array_from(object(), "int64", (2,), "numpy")


BLOB = pack({"ids": np.arange(5, dtype=np.int64), "mask": np.ones(3, bool), "meta": ("x", 1)})


def test_every_truncation_of_a_blob_raises_codec_error() -> None:
    for cut in range(len(BLOB)):
        with pytest.raises(CodecError):
            unpack(BLOB[:cut])


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"XXXX" + BLOB[4:],
        BLOB + b"\x00" * 8,
        struct.pack("<4sI", b"AFC1", 0),
        struct.pack("<4sI", b"AFC1", 2**32 - 1) + bytes(64),
        struct.pack("<4sIQ", b"AFC1", 1, 2**64 - 1) + bytes(64),
        memoryview(bytes(64))[::2],
        "AFC1 not bytes",
    ],
    ids=lambda b: repr(b)[:40],
)
def test_malformed_blobs_raise_codec_error(blob: Any) -> None:
    with pytest.raises(CodecError):
        unpack(blob)


@FAST
@given(st.binary(max_size=64))
def test_random_headers_never_leak_other_errors(data: bytes) -> None:
    try:
        decode([data])
    except CodecError:
        pass


@FAST
@given(st.integers(0, len(BLOB) - 1), st.integers(0, 255))
def test_corrupted_blobs_never_leak_other_errors(position: int, byte: int) -> None:
    corrupt = bytearray(BLOB)
    corrupt[position] = byte
    try:
        unpack(bytes(corrupt))
    except CodecError:
        pass
