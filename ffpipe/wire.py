"""The wire codec: pure functions between a `Message` and ZeroMQ frames. No sockets, no FF, no pickle.

A message is a multipart ZeroMQ message:
  frame 0      msgpack map {"v": 1, "kind", "seq", "epoch", "scalars": {str: int|float|str|bool|None},
                            "tensors": [[name, dtype, shape], ...]}
  frames 1..n  the raw, C-contiguous bytes of each tensor, in the order of "tensors"

`decode` validates everything (version, kind, field types, dtype whitelist, shape x itemsize = frame
length, size caps, finite floats) and raises `WireError` for anything else, so a worker can count a bad
message and keep serving.
"""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field

import msgpack
import torch

VERSION = 1
KINDS = ("train", "eval", "stop", "beliefs", "ack", "gap", "heartbeat")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 16
MAX_DIMS = 4
MAX_TENSOR_BYTES = 512 * 1024 * 1024  # per tensor, both ways; sockets also cap each frame (MAXMSGSIZE)
MAX_DIM = 2**31


class WireError(Exception):
    """A message that is not a valid ffpipe message. The text says what was wrong."""


class Rejections(collections.Counter):
    """The malformed messages a role refused, counted by reason. Each reason is logged once, as
    "ffpipe ROLE: rejected a message: REASON"; past MAX_REASONS distinct ones, the rest count as "other reasons"."""

    MAX_REASONS = 20

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def add(self, reason: str) -> None:
        if reason not in self and len(self) >= self.MAX_REASONS:
            reason = "other reasons"
        if reason not in self:
            print(f"ffpipe {self.role}: rejected a message: {reason}", flush=True)
        self[reason] += 1

    def total(self) -> int:
        return sum(self.values())

    def reasons(self) -> str:
        """For summary.json: "reason xN; ...", at most 2,000 characters."""
        return "; ".join(f"{k} x{v}" for k, v in self.items())[:2000]


@dataclass
class Message:
    kind: str
    seq: int = 0
    epoch: int = 0
    scalars: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _tensor_buffer(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (CPU, contiguous); works for every whitelisted dtype."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def encode(msg: Message) -> list:
    """Message -> [header bytes, tensor buffers...]. Raises WireError for what decode would refuse."""
    if msg.kind not in KINDS:
        raise WireError(f"unknown kind {msg.kind!r}")
    if len(msg.tensors) > MAX_TENSORS:
        raise WireError(f"{len(msg.tensors)} tensors, at most {MAX_TENSORS}")
    descriptors, frames = [], []
    for name, t in msg.tensors.items():
        if t.dtype not in _NAMES:
            raise WireError(f"tensor {name!r}: dtype {t.dtype} is not sent on the wire")
        if t.numel() * t.element_size() > MAX_TENSOR_BYTES or t.ndim > MAX_DIMS:
            raise WireError(f"tensor {name!r} of shape {tuple(t.shape)} exceeds the wire's caps (4 dims, {MAX_TENSOR_BYTES} bytes)")
        descriptors.append([name, _NAMES[t.dtype], list(t.shape)])
        frames.append(_tensor_buffer(t))
    header = {"v": VERSION, "kind": msg.kind, "seq": int(msg.seq), "epoch": int(msg.epoch),
              "scalars": msg.scalars, "tensors": descriptors}
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError(f"header cannot be packed: {e}") from e
    if len(packed) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(packed)} bytes, at most {MAX_HEADER_BYTES}")
    return [packed, *frames]


def _buffer(frame) -> memoryview:
    """bytes, memoryview or zmq.Frame -> memoryview (no copy)."""
    buf = getattr(frame, "buffer", frame)
    try:
        return memoryview(buf)
    except TypeError as e:
        raise WireError(f"frame of type {type(frame).__name__} has no buffer") from e


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def decode(frames: list, *, check_finite: bool = True, max_tensor_bytes: int = MAX_TENSOR_BYTES) -> Message:
    """[header, tensor frames...] -> Message, or WireError. Tensors share memory with the frames."""
    if not frames:
        raise WireError("empty message")
    head = _buffer(frames[0])
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(head)} bytes, at most {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise WireError(f"header is not valid msgpack: {type(e).__name__}: {e}") from e
    if not isinstance(header, dict):
        raise WireError(f"header is a {type(header).__name__}, not a map")
    if header.get("v") != VERSION:
        raise WireError(f"unsupported version {header.get('v')!r} (this build speaks {VERSION})")
    kind = header.get("kind")
    if kind not in KINDS:
        raise WireError(f"unknown kind {kind!r}")
    seq, epoch = header.get("seq"), header.get("epoch")
    if not (_is_int(seq) and _is_int(epoch) and seq >= 0 and epoch >= 0):
        raise WireError(f"seq and epoch must be non-negative integers, got {seq!r} and {epoch!r}")
    scalars = header.get("scalars")
    if not isinstance(scalars, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str))) for k, v in scalars.items()
    ):
        raise WireError("scalars must map names to numbers, strings, booleans or null")
    descriptors = header.get("tensors")
    if not isinstance(descriptors, list) or len(descriptors) > MAX_TENSORS:
        raise WireError(f"tensors must be a list of at most {MAX_TENSORS} descriptors")
    if len(frames) != 1 + len(descriptors):
        raise WireError(f"header describes {len(descriptors)} tensors but {len(frames) - 1} frames follow")
    tensors = {}
    for desc, frame in zip(descriptors, frames[1:], strict=True):
        tensors.update([_decode_tensor(desc, frame, tensors, check_finite, max_tensor_bytes)])
    return Message(kind, seq, epoch, scalars, tensors)


def _decode_tensor(desc, frame, seen: dict, check_finite: bool, max_bytes: int) -> tuple[str, torch.Tensor]:
    if not (isinstance(desc, list) and len(desc) == 3 and isinstance(desc[0], str) and isinstance(desc[1], str)
            and isinstance(desc[2], list)):
        raise WireError(f"bad tensor descriptor {desc!r} (expected [name, dtype, shape])")
    name, dtype_name, shape = desc
    if name in seen:
        raise WireError(f"tensor {name!r} appears twice")
    if dtype_name not in DTYPES:
        raise WireError(f"tensor {name!r}: unsupported dtype {dtype_name!r}")
    if len(shape) > MAX_DIMS or not all(_is_int(d) and 0 <= d < MAX_DIM for d in shape):
        raise WireError(f"tensor {name!r}: bad shape {shape!r}")
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    if nbytes > max_bytes:
        raise WireError(f"tensor {name!r}: {nbytes} bytes exceeds the cap of {max_bytes}")
    buf = _buffer(frame)
    if len(buf) != nbytes:
        raise WireError(f"tensor {name!r}: shape {shape} of {dtype_name} needs {nbytes} bytes, frame has {len(buf)}")
    if nbytes == 0:
        try:
            t = torch.empty(shape, dtype=dtype)
        except RuntimeError as e:  # no memory, but torch refuses e.g. [0, 2**31-1, 2**31-1, 4]: its strides overflow
            raise WireError(f"tensor {name!r}: empty shape {shape} cannot be made ({e})") from e
    else:
        with warnings.catch_warnings():  # received frames are read-only; nothing here writes to them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)
    if check_finite and t.is_floating_point() and t.numel() and not _finite(t):
        raise WireError(f"tensor {name!r} holds NaN or Inf")
    return name, t


def check_finite(tensors: dict[str, torch.Tensor], skip: Collection[str] = ()) -> None:
    """decode's finite check, for a receiver that decoded with check_finite=False: WireError if a float tensor
    not named in `skip` holds NaN or Inf. A layer skips the inputs of its update, whose loss checks them."""
    for name, t in tensors.items():
        if name not in skip and t.is_floating_point() and t.numel() and not _finite(t):
            raise WireError(f"tensor {name!r} holds NaN or Inf")


def _finite(t: torch.Tensor) -> bool:
    """No NaN and no Inf. A NaN or an Inf anywhere makes the sum NaN or infinite, so a finite sum settles it in
    one pass (4x cheaper than min and max, 25x cheaper than isfinite(t).all(), which was once most of the wire's
    time per message); only a non-finite sum, which finite values can also give by overflowing, is looked at
    again with min and max, which propagate NaN and show an Inf."""
    if torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)):
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def parse_shape(text) -> tuple[int, ...] | None:
    """The source's "CxHxW" input shape scalar -> (C, H, W); None when absent."""
    if text is None:
        return None
    try:
        shape = tuple(int(p) for p in str(text).split("x"))
    except ValueError:
        raise WireError(f"shape must look like 3x32x32, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1 or math.prod(shape) > (1 << 22):
        raise WireError(f"shape must be three positive sizes, got {text!r}")
    return shape
