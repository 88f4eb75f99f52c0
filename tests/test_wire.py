"""The codec: round trips of every dtype and shape; malformed frames raise WireError and nothing else."""

import math
import warnings

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])  # float16's is summed in float32
def test_finite_values_whose_sum_overflows_are_accepted(dtype):
    big = torch.full((64,), torch.finfo(dtype).max, dtype=dtype)  # every value finite, their sum is not
    assert not torch.isfinite(big.sum(dtype=torch.float64 if dtype == torch.float64 else torch.float32))
    assert torch.equal(decode([bytes(f) for f in encode(Message("train", tensors={"x": big}))]).tensors["x"], big)
    mixed = torch.cat([big[:8], -big[:8]])  # +max and -max: an overflowing partial sum either way
    assert torch.equal(decode([bytes(f) for f in encode(Message("train", tensors={"x": mixed}))]).tensors["x"], mixed)


# ---- fuzzing: whatever arrives, decode returns a consistent Message or raises WireError, nothing else

FUZZ = settings(max_examples=300, deadline=None, derandomize=True)  # derandomized: CI sees the same examples
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False), st.text(max_size=8))
PACKABLE = st.recursive(  # any msgpack value, non-str map keys and bin included
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=6), st.binary(max_size=6)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-3, 3)), inner, max_size=4),
    max_leaves=8,
)
EVIL = st.one_of(  # replacements for one header field: wrong types, absurd sizes, unknown names
    PACKABLE,
    st.sampled_from([[2**30, 2**30], [2**31, 1], [2**31 - 1] * 4, [0, 2**31 - 1, 2**31 - 1, 2**31 - 1], [-1, 3], [1] * 5,
                     [2**63], [1.0, 2], [True], "complex64", "object", "float32 ", "FLOAT32", 0, 2, "exec", "ack ",
                     {"a": {"b": 1}}, {1: 2}, [["x", "float64", [2**30, 2**30]]], [["x", "float32", [2, 3]]] * 17,
                     float("nan"), float("inf"), -1, 2**64 - 1]),
)


@st.composite
def tensors(draw) -> torch.Tensor:
    """A small tensor of a wire dtype, finite, sometimes non-contiguous."""
    dtype = draw(st.sampled_from(list(wire.DTYPES.values())))
    shape = draw(st.lists(st.integers(0, 5), max_size=wire.MAX_DIMS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=g) * 100).to(dtype)
    elif dtype == torch.bool:
        t = torch.randint(0, 2, shape, generator=g).bool()
    else:
        t = torch.randint(torch.iinfo(dtype).min, torch.iinfo(dtype).max, shape, generator=g, dtype=dtype)
    if t.ndim >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1).contiguous().transpose(0, 1)  # same values and shape, not contiguous
    return t


@st.composite
def messages(draw, min_tensors: int = 0) -> Message:
    names = draw(st.lists(st.text(min_size=1, max_size=6), unique=True, min_size=min_tensors, max_size=4))
    return Message(draw(st.sampled_from(wire.KINDS)), draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1)),
                   draw(st.dictionaries(st.text(max_size=8), SCALARS, max_size=4)), {n: draw(tensors()) for n in names})


def _paths(obj, prefix=()):
    """Every place in a header below the root: each map value and each list element, recursively."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


@st.composite
def mutated(draw) -> list:
    """A valid message's frames, then one corruption of its bytes or its frames."""
    frames = [bytes(f) for f in encode(draw(messages()))]
    head, last = frames[0], len(frames) - 1
    how = draw(st.sampled_from(["flip", "truncate header", "drop", "duplicate", "add", "swap", "cut tensor", "extend tensor"]))
    if how == "flip":
        i = draw(st.integers(0, len(head) - 1))
        frames[0] = head[:i] + bytes([head[i] ^ draw(st.integers(1, 255))]) + head[i + 1 :]
    elif how == "truncate header":
        frames[0] = head[: draw(st.integers(0, len(head) - 1))]
    elif how == "drop":
        del frames[draw(st.integers(0, last))]
    elif how == "duplicate":
        i = draw(st.integers(0, last))
        frames.insert(i, frames[i])
    elif how == "add":
        frames.insert(draw(st.integers(0, last + 1)), draw(st.binary(max_size=64)))
    elif how == "swap" and last:
        i, j = draw(st.lists(st.integers(0, last), min_size=2, max_size=2, unique=True))
        frames[i], frames[j] = frames[j], frames[i]
    elif how == "cut tensor" and last:
        i = draw(st.integers(1, last))
        frames[i] = frames[i][: draw(st.integers(0, max(len(frames[i]) - 1, 0)))]
    elif how == "extend tensor" and last:
        frames[draw(st.integers(1, last))] += draw(st.binary(min_size=1, max_size=16))
    return frames


@st.composite
def field_mutated(draw) -> list:
    """A valid message whose header is re-packed with one field (at any depth) replaced, deleted or added.
    (A header that is not a map at all is test_fuzz_any_msgpack_header's.)"""
    frames = [bytes(f) for f in encode(draw(messages(min_tensors=1)))]
    header = msgpack.unpackb(frames[0], raw=False)
    path = draw(st.sampled_from(list(_paths(header))[::-1]))  # deepest first: hypothesis favours early entries
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    how = draw(st.sampled_from(["replace", "delete", "add key"]))
    if how == "replace":
        parent[path[-1]] = draw(EVIL)
    elif how == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.one_of(st.integers(-3, 3), st.binary(max_size=3), st.text(max_size=3)))] = draw(EVIL)
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


@st.composite
def nearly_valid(draw) -> list:
    """Headers of the right shape whose values are right or nearly (edge sizes, wrong names), with frames of the
    declared length when that is small: they reach the size and stride arithmetic that random bytes rarely do."""
    descriptors, frames = [], []
    for _ in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from([*wire.DTYPES, "complex64"]))
        shape = draw(st.one_of(st.lists(st.one_of(st.integers(0, 4), st.sampled_from([0, 2**31 - 1, 2**31, -1])), max_size=5),
                               st.permutations([0, 2**31 - 1, 2**31 - 1, 2**31 - 1]), st.permutations([0, 2**30, 2**30, 64])))
        descriptors.append([draw(st.sampled_from(["x", "y", "z"])), dtype, shape])
        known = dtype in wire.DTYPES and all(d >= 0 for d in shape)
        size = math.prod(shape) * wire.DTYPES[dtype].itemsize if known else -1
        frames.append(bytes(size) if 0 <= size <= 4096 and draw(st.booleans()) else draw(st.binary(max_size=16)))
    header = {"v": draw(st.sampled_from([1, 1, 1, 2, 1.0])), "kind": draw(st.sampled_from([*wire.KINDS, "exec"])),
              "seq": draw(st.sampled_from([0, 2**64 - 1, 0, -1])), "epoch": draw(st.sampled_from([0, 3, 0, None])),
              "scalars": draw(st.dictionaries(st.text(max_size=3), st.one_of(SCALARS, PACKABLE), max_size=3)),
              "tensors": descriptors}
    return [msgpack.packb(header, use_bin_type=True), *frames]


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _decode_or_wire_error(frames: list) -> Message | None:
    """decode's contract: a message consistent with its frames (tensors are views of them, nothing sized from the
    header alone), or WireError. Any other exception fails the test."""
    try:
        msg = decode(frames)
    except WireError:
        return None
    assert msg.kind in wire.KINDS and _is_count(msg.seq) and _is_count(msg.epoch)
    assert all(isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str))) for k, v in msg.scalars.items())
    assert len(frames) == 1 + len(msg.tensors) <= 1 + wire.MAX_TENSORS
    for t, frame in zip(msg.tensors.values(), frames[1:], strict=True):
        assert t.dtype in wire.DTYPES.values() and t.ndim <= wire.MAX_DIMS
        assert t.numel() * t.element_size() == len(frame) <= wire.MAX_TENSOR_BYTES
        if len(frame):  # zero-copy: the tensor is the frame's memory
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                assert t.data_ptr() == torch.frombuffer(frame, dtype=torch.uint8).data_ptr()
        if t.is_floating_point() and t.numel():
            assert torch.isfinite(t).all()
    return msg


@FUZZ
@given(st.lists(st.binary(max_size=256), max_size=20))
def test_fuzz_arbitrary_frames(frames):
    _decode_or_wire_error(frames)


@FUZZ
@given(PACKABLE, st.lists(st.binary(max_size=64), max_size=5))
def test_fuzz_any_msgpack_header(header, rest):
    _decode_or_wire_error([msgpack.packb(header, use_bin_type=True), *rest])


@FUZZ
@given(messages(), st.booleans())
def test_fuzz_valid_messages_round_trip_exactly(msg, as_bytes):
    frames = encode(msg)
    back = _decode_or_wire_error([bytes(f) for f in frames] if as_bytes else frames)
    assert back is not None
    assert (back.kind, back.seq, back.epoch, back.scalars) == (msg.kind, msg.seq, msg.epoch, msg.scalars)
    assert list(back.tensors) == list(msg.tensors)
    for name, t in msg.tensors.items():
        assert back.tensors[name].dtype == t.dtype and torch.equal(back.tensors[name], t), name


@FUZZ
@given(mutated())
def test_fuzz_corrupted_bytes_and_frames(frames):
    _decode_or_wire_error(frames)


@FUZZ
@given(nearly_valid())
def test_fuzz_nearly_valid_headers(frames):
    _decode_or_wire_error(frames)


@FUZZ
@given(field_mutated())
def test_fuzz_one_header_field_replaced(frames):
    _decode_or_wire_error(frames)


def test_absurd_declared_sizes_are_refused_before_anything_is_allocated():
    for shape in ([2**30, 2**30], [2**31 - 1] * 4, [2**31 - 1, 2**31 - 1, 2**31 - 1, 2]):
        with pytest.raises(WireError, match="exceeds the cap"):
            decode(_frames(tensors=[["x", "float64", shape]])[:1] + [b""])
    # empty tensors with absurd other dims: torch.empty raised RuntimeError (its strides overflow) here once
    for shape in ([0, 2**31 - 1, 2**31 - 1, 2**31 - 1], [0, 2**31 - 1, 2**31 - 1, 4]):
        with pytest.raises(WireError, match="cannot be made"):
            decode(_frames(tensors=[["x", "float32", shape]])[:1] + [b""])
    for shape in ([0, 784], [0, 2**30, 2**30], [2**31 - 1, 0, 2**31 - 1, 2**31 - 1]):  # torch makes these: they pass
        assert decode(encode(Message("train", tensors={"x": torch.empty(shape)}))).tensors["x"].shape == tuple(shape)


def test_check_finite_refuses_what_decode_would_and_skips_only_the_names_given():
    from ffpipe.wire import check_finite

    bad = torch.tensor([1.0, math.nan])
    tensors = {"x_pos": bad, "goodness": torch.zeros(2), "idx": torch.arange(2)}
    with pytest.raises(WireError, match="'x_pos' holds NaN or Inf"):
        check_finite(tensors)
    check_finite(tensors, skip=("x_pos",))
    with pytest.raises(WireError, match="'goodness' holds NaN or Inf"):
        check_finite({**tensors, "goodness": torch.tensor([math.inf])}, skip=("x_pos",))
    frames = [bytes(f) for f in encode(Message("train", tensors=tensors))]
    with pytest.raises(WireError, match="NaN or Inf"):
        decode(frames)
    check_finite(decode(frames, check_finite=False).tensors, skip=("x_pos",))
