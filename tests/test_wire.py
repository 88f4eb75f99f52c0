"""The codec: round trips of every dtype and shape; malformed frames raise WireError and nothing else."""

import math

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ffpipe import wire
from ffpipe.wire import Message, WireError, decode, encode


def _roundtrip(msg: Message) -> Message:
    return decode([bytes(f) for f in encode(msg)])


@pytest.mark.parametrize("dtype", list(wire.DTYPES.values()))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 5), (0, 4), (2, 3, 4), (1, 1, 2, 3)])
def test_every_dtype_and_shape_round_trips_exactly(dtype, shape):
    t = (torch.randn(shape) * 50).to(dtype) if dtype.is_floating_point else torch.randint(0, 2 if dtype == torch.bool else 100, shape).to(dtype)
    back = _roundtrip(Message("train", 7, 2, {"lr": 0.5, "name": "x", "flag": True, "none": None}, {"t": t}))
    assert back.kind == "train" and back.seq == 7 and back.epoch == 2
    assert back.scalars == {"lr": 0.5, "name": "x", "flag": True, "none": None}
    assert back.tensors["t"].dtype == dtype and back.tensors["t"].shape == torch.Size(shape)
    assert torch.equal(back.tensors["t"], t)


def test_non_contiguous_tensors_and_order_are_kept():
    a = torch.arange(12.0).view(3, 4).T  # non-contiguous
    b = torch.arange(5)
    back = _roundtrip(Message("eval", tensors={"a": a, "b": b}))
    assert list(back.tensors) == ["a", "b"]
    assert torch.equal(back.tensors["a"], a)


def test_large_frames_are_not_copied_on_encode():
    t = torch.randn(256, 1000)
    frames = encode(Message("train", tensors={"x": t}))
    assert isinstance(frames[1], memoryview)
    assert frames[1].obj is not None and torch.frombuffer(frames[1], dtype=torch.float32).data_ptr() == t.data_ptr()


@settings(max_examples=60, deadline=None)
@given(
    seq=st.integers(0, 2**40), epoch=st.integers(0, 10_000),
    shape=st.lists(st.integers(0, 6), min_size=0, max_size=4),
    scalars=st.dictionaries(st.text(max_size=8), st.one_of(st.none(), st.booleans(), st.integers(-2**31, 2**31), st.floats(allow_nan=False), st.text(max_size=8)), max_size=4),
)
def test_property_round_trip(seq, epoch, shape, scalars):
    t = torch.randn(shape)
    back = _roundtrip(Message("train", seq, epoch, scalars, {"x": t}))
    assert (back.seq, back.epoch, back.scalars) == (seq, epoch, scalars)
    assert torch.equal(back.tensors["x"], t)


def _frames(**header_changes):
    header = {"v": 1, "kind": "train", "seq": 0, "epoch": 0, "scalars": {}, "tensors": [["x", "float32", [2, 3]]]}
    header.update(header_changes)
    return [msgpack.packb(header), bytes(24)]


@pytest.mark.parametrize(
    "frames,match",
    [
        ([], "empty"),
        ([b"\xc1garbage"], "msgpack"),
        ([msgpack.packb([1, 2, 3])], "not a map"),
        (_frames(v=2), "version"),
        (_frames(kind="exec"), "kind"),
        (_frames(seq=-1), "seq"),
        (_frames(seq="3"), "seq"),
        (_frames(scalars={"a": [1, 2]}), "scalars"),
        (_frames(scalars=[1]), "scalars"),
        (_frames(tensors="x"), "tensors"),
        (_frames(tensors=[["x", "object", [2, 3]]]), "dtype"),
        (_frames(tensors=[["x", "float32", [2, -3]]]), "shape"),
        (_frames(tensors=[["x", "float32", [1, 1, 1, 1, 1]]]), "shape"),
        (_frames(tensors=[["x", "float32"]]), "descriptor"),
        (_frames(tensors=[["x", "float32", [2, 4]]]), "needs 32 bytes"),
        (_frames(tensors=[["x", "float32", [2**20, 2**20]]]), "exceeds the cap"),
        (_frames(tensors=[["x", "float32", [2, 3]], ["y", "int64", [1]]]), "2 tensors but 1 frames"),
        (_frames(tensors=[["x", "float32", [1, 3]], ["x", "float32", [1, 3]]]) + [bytes(12)], "twice"),
        (_frames()[:1], "1 tensors but 0 frames"),
        ([b"\x00" * (wire.MAX_HEADER_BYTES + 1)], "header of"),
    ],
)
def test_malformed_messages_raise_wire_error(frames, match):
    if match == "twice":
        frames = [frames[0], bytes(12), bytes(12)]
    with pytest.raises(WireError, match=match):
        decode(frames)


def test_truncated_tensor_frame():
    frames = encode(Message("train", tensors={"x": torch.randn(4, 4)}))
    with pytest.raises(WireError, match="needs 64 bytes"):
        decode([frames[0], bytes(frames[1])[:-1]])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused(bad):
    t = torch.zeros(3)
    t[1] = bad
    with pytest.raises(WireError, match="NaN or Inf"):
        _roundtrip(Message("train", tensors={"x": t}))
    assert decode([bytes(f) for f in encode(Message("train", tensors={"x": t}))], check_finite=False).tensors["x"].shape == (3,)


def test_encode_refuses_what_decode_would():
    with pytest.raises(WireError, match="kind"):
        encode(Message("hello"))
    with pytest.raises(WireError, match="dtype"):
        encode(Message("train", tensors={"c": torch.zeros(2, dtype=torch.complex64)}))
    with pytest.raises(WireError, match="packed"):
        encode(Message("train", scalars={"obj": object()}))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_random_bytes_never_escape_as_another_exception(frames):
    try:
        decode(frames)
    except WireError:
        pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_a_single_non_finite_value_anywhere_is_refused(dtype):
    for n in (1, 7, 33, 1000):  # sizes around vector widths, so every position of a SIMD tail is tried
        for i in range(n) if n < 100 else (0, 499, 998, 999):
            for bad in (math.nan, math.inf, -math.inf):
                t = torch.rand(n).to(dtype)
                t[i] = bad
                with pytest.raises(WireError, match="NaN or Inf"):
                    decode([bytes(f) for f in encode(Message("train", tensors={"x": t}))])
