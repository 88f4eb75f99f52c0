"""ZeroMQ socket helpers: PUSH/PULL links with bounded queues, timeouts and explicit linger. No FF here.

Every role binds the socket it receives on and connects the sockets it sends on, so roles can start in
any order (ZeroMQ retries connections). High-water marks bound the messages queued on each side of a link.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from ffpipe import security
from ffpipe.security import Keys
from ffpipe.wire import Message, Rejections, WireError, decode, encode


def queue_depth() -> int:
    """The high-water mark of every link: FFPIPE_HWM, read when a socket is made (a bad value is a ValueError
    there, not at import)."""
    text = os.environ.get("FFPIPE_HWM", "2")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"FFPIPE_HWM must be a positive integer (messages queued per socket); got {text!r}")
    return int(text)


# Messages queued in a sender and in a receiver: with both, a link holds a handful of batches. FFPIPE_HWM sets
# both (the benchmark's batches-in-flight sweep); the default 2 keeps layers fed without hoarding memory.
STOPPED_ALONE = 128 + 15  # a layer's or the sink's exit status after a SIGTERM of its own mid-run (128 + SIGTERM)
ORPHAN_EXIT_S = 5.0  # a role whose launcher is gone has this long after its SIGTERM to save what it holds
MAX_MSG_BYTES = 1 << 30  # what we send at most; receiving sockets drop (and ZeroMQ disconnects) any frame above this.
# ZeroMQ applies MAXMSGSIZE per frame and delivers a multipart message whole, so a peer can still queue many frames:
# the decoder refuses more than MAX_TENSORS of them, once they are here (--keys keeps such peers out)
KERNEL_BUFFER = 256 * 1024  # TCP send/receive buffers: without a cap the kernel would hold many small batches
LINGER_MS = 2000  # how long close() may wait to flush queued messages (stop must get through)
_SMALL = 16 * 1024  # frames below this are copied into ZeroMQ (cheaper than tracking them)
HEARTBEAT_S = 0.5  # every role but the sink tells the sink this often that it is alive
SILENT_S = 3.0  # a role not heard from for this long is reported (and reported again when it is back)


class PeerTimeout(Exception):
    """A send or receive did not complete within its timeout: the peer is gone, stopped or stuck."""


@dataclass(frozen=True)
class Endpoint:
    """host:port of a receiving role. It binds bind_host:port and its senders connect to host:port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        host, sep, port = text.strip().removeprefix("tcp://").rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"endpoint must look like host:port (e.g. 127.0.0.1:5555); got {text!r}")
        return cls(host, int(port))

    def connect_url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def bind_url(self, bind_host: str) -> str:
        return f"tcp://{bind_host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def exit_soon_if_orphaned(seconds: float = ORPHAN_EXIT_S) -> None:
    """Called from a role's SIGTERM handler. When the launcher that started this process is gone (its death sent
    the SIGTERM, PR_SET_PDEATHSIG), no one waits for an orderly stop and its peers are going too: end the process
    within `seconds`, whatever it is waiting on (a send to a dead peer would wait out the peer timeout)."""
    parent = os.environ.get("FFPIPE_LAUNCHER_PID")
    if parent and parent.isdigit() and os.getppid() != int(parent):
        timer = threading.Timer(seconds, os._exit, (STOPPED_ALONE,))
        timer.daemon = True
        timer.start()


class IdleClock:
    """Adds up consecutive empty polls of a role's inbox; past `limit_ms` the peer counts as gone."""

    def __init__(self, who: str, limit_ms: int):
        self.who, self.limit_ms, self.waited_ms = who, limit_ms, 0
        self.since = time.monotonic()  # the last message taken

    def tick(self, ms: int) -> None:
        self.waited_ms += ms
        if self.waited_ms >= self.limit_ms:
            raise PeerTimeout(f"{self.who}: nothing received for {self.waited_ms / 1000:g}s")

    def rejected(self) -> None:
        """A refused message is no sign of life either: past the limit since the last message taken (wall time,
        so a stream of junk cannot hold the role waiting for ever), the peer counts as gone."""
        waited = time.monotonic() - self.since
        if waited * 1000 >= self.limit_ms:
            raise PeerTimeout(f"{self.who}: nothing but refused messages for {waited:.0f}s")

    def reset(self) -> None:
        self.waited_ms = 0
        self.since = time.monotonic()


def pull(ctx: zmq.Context, url: str, hwm: int | None = None, keys: Keys | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, queue_depth() if hwm is None else hwm)
    sock.setsockopt(zmq.RCVBUF, KERNEL_BUFFER)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_BYTES)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.secure_server(sock)
    sock.bind(url)
    return sock


def push(ctx: zmq.Context, url: str, hwm: int | None = None, linger_ms: int = LINGER_MS, keys: Keys | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, queue_depth() if hwm is None else hwm)
    sock.setsockopt(zmq.SNDBUF, KERNEL_BUFFER)
    sock.setsockopt(zmq.LINGER, linger_ms)
    if keys is not None:
        keys.secure_client(sock)
    sock.connect(url)
    return sock


class Links:
    """One role's ZeroMQ context and sockets; with `keys`, every link is CURVE-encrypted and authenticated."""

    def __init__(self, keys: Keys | None = None):
        self.ctx, self.keys = zmq.Context(), keys
        self.auth = security.authenticator(self.ctx, keys) if keys is not None else None

    def pull(self, url: str, hwm: int | None = None) -> zmq.Socket:
        return pull(self.ctx, url, hwm, self.keys)

    def push(self, url: str, hwm: int | None = None, linger_ms: int = LINGER_MS) -> zmq.Socket:
        return push(self.ctx, url, hwm, linger_ms, self.keys)

    def close(self) -> None:
        """After the role closed its sockets (a socket still lingering delays this, as with ctx.term)."""
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


class Heartbeat:
    """A daemon thread that tells the sink every HEARTBEAT_S that this role is alive and what it is doing.

    It has its own socket (a ZeroMQ socket belongs to one thread) into the sink's inbox; a full queue drops
    the beat. A process that is stopped, hung in a system call or dead goes silent, and the sink says so."""

    def __init__(self, links: Links, url: str, role: str, status: Callable[[], dict]):
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(links, url, role, status), name="heartbeat", daemon=True)
        self._thread.start()

    def _run(self, links: Links, url: str, role: str, status: Callable[[], dict]) -> None:
        sock = links.push(url, hwm=1, linger_ms=0)
        try:
            while not self._done.wait(HEARTBEAT_S):
                try:
                    send_nowait(sock, Message("heartbeat", 0, 0, {"role": role, "pid": os.getpid(), **status()}))
                except (PeerTimeout, WireError):
                    pass
        finally:
            sock.close()

    def stop(self) -> None:
        """Before the role closes its Links."""
        self._done.set()
        self._thread.join(timeout=5)


def send(sock: zmq.Socket, msg: Message, timeout_ms: int | None = None) -> None:
    """Send one message; blocks while the peer's queue is full (backpressure), up to timeout_ms."""
    frames = encode(msg)
    size = sum(len(f) for f in frames)
    if size > MAX_MSG_BYTES:  # ZeroMQ would drop it silently at the receiver
        raise WireError(f"a {msg.kind} message of {size} bytes exceeds the {MAX_MSG_BYTES}-byte cap; use smaller batches")
    if timeout_ms is not None and not sock.poll(timeout_ms, zmq.POLLOUT):
        raise PeerTimeout(f"could not send a {msg.kind} message within {timeout_ms / 1000:g}s (peer gone or stuck)")
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, zmq.SNDMORE if i < last else 0, copy=len(frame) < _SMALL)


def send_nowait(sock: zmq.Socket, msg: Message) -> None:
    """Send if the peer's queue has room now; otherwise raise PeerTimeout (the caller may drop the message)."""
    send(sock, msg, timeout_ms=0)


def recv(sock: zmq.Socket, timeout_ms: int | None = None, check_finite: bool = True) -> Message | None:
    """One message, or None when nothing arrived within timeout_ms. A malformed message raises WireError.
    check_finite=False leaves NaN and Inf to the caller (`wire.check_finite`)."""
    if timeout_ms is not None and not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    frames = sock.recv_multipart(copy=False)
    try:
        return decode(frames, check_finite=check_finite)
    except WireError as e:  # say who sent it
        raise WireError(f"from {_peer(frames[0])}: {e}") from None


def reject_the_rest(sock: zmq.Socket, rejected: Rejections, expected: tuple[str, ...], quiet_ms: int = 100,
                    limit_s: float = 2.0) -> None:
    """For a role that has taken the stream's stop, whose peers send nothing after it but the kinds in `expected`
    (a resent stop, a heartbeat): read what is still on its way to `sock`, until nothing else comes for quiet_ms
    (the expected kinds, which come on their own clock, do not extend it) or for at most limit_s, and count each
    other message in `rejected`. ZeroMQ takes turns between a socket's peers, so a stranger's queue may outlast
    the stream's; left unread, its messages would be missing from the run's count."""
    deadline = time.monotonic() + limit_s
    quiet_until = time.monotonic() + quiet_ms / 1000
    while (now := time.monotonic()) < min(deadline, quiet_until):
        try:
            msg = recv(sock, max(1, int((min(deadline, quiet_until) - now) * 1000)))
        except WireError as e:
            rejected.add(f"after the stop: {e}"[:160])
        else:
            if msg is None:
                return
            if msg.kind in expected:
                continue
            rejected.add(f"after the stop: a {msg.kind!r} message")
        quiet_until = time.monotonic() + quiet_ms / 1000


def _peer(frame) -> str:
    """The sender's IP address as ZeroMQ saw it (TCP), or 'unknown'."""
    try:
        return frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError, TypeError, ValueError):
        return "unknown"


__all__ = ["Endpoint", "Heartbeat", "Links", "PeerTimeout", "WireError", "pull", "push", "reject_the_rest", "send", "send_nowait", "recv"]
