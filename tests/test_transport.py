"""Socket helpers: endpoints, round trips over loopback, timeouts instead of hangs."""

import pytest
import torch
import zmq

from ffpipe import transport
from ffpipe.topology import Topology
from ffpipe.wire import Message, WireError


def test_endpoint_parsing():
    e = transport.Endpoint.parse("tcp://layer-1:5551")
    assert (e.host, e.port) == ("layer-1", 5551) and e.connect_url() == "tcp://layer-1:5551"
    assert e.bind_url("0.0.0.0") == "tcp://0.0.0.0:5551"
    for bad in ("nohost", ":5551", "host:0", "host:99999", "host:port"):
        with pytest.raises(ValueError, match="host:port"):
            transport.Endpoint.parse(bad)


def test_topology_local_gives_distinct_loopback_ports_and_downstream():
    topo = Topology.local(3)
    ports = {topo.source.port, topo.sink.port, *(e.port for e in topo.layers)}
    assert len(ports) == 5 and all(e.host == "127.0.0.1" for e in topo.layers)
    assert topo.downstream(0) == topo.layers[1] and topo.downstream(2) == topo.sink
    assert Topology.parse(*[a for a in topo.as_flags()[1::2]]) == topo


@pytest.mark.timeout(30)
def test_round_trip_timeouts_and_backpressure():
    ctx = zmq.Context()
    topo = Topology.local(1)
    inbox = transport.pull(ctx, topo.layers[0].bind_url("127.0.0.1"))
    out = transport.push(ctx, topo.layers[0].connect_url(), linger_ms=0)
    try:
        assert transport.recv(inbox, 50) is None  # nothing there: None, not a hang
        transport.send(out, Message("train", 1, 0, {"batch": 1}, {"x": torch.ones(2, 3)}), 2000)
        got = transport.recv(inbox, 2000)
        assert got.scalars == {"batch": 1} and torch.equal(got.tensors["x"], torch.ones(2, 3))
        # nobody reads: the sender's queue fills and send times out instead of blocking forever
        with pytest.raises(transport.PeerTimeout):
            for _ in range(10_000):
                transport.send(out, Message("train", tensors={"x": torch.zeros(64, 1024)}), 100)
        out2 = transport.push(ctx, topo.layers[0].connect_url(), linger_ms=0)
        out2.send_multipart([b"garbage"])
        with pytest.raises(WireError):
            for _ in range(100):  # drain the queued good messages; the garbage one raises
                assert transport.recv(inbox, 2000) is not None
        out2.close()
    finally:
        inbox.close()
        out.close()
        ctx.term()


def test_idle_clock_raises_past_its_limit():
    clock = transport.IdleClock("layer 3", 1000)
    clock.tick(600)
    clock.reset()
    clock.tick(900)
    with pytest.raises(transport.PeerTimeout, match="layer 3: nothing received for 1.2s"):
        clock.tick(300)


def test_a_stream_of_refused_messages_does_not_hold_the_idle_clock(monkeypatch):
    """Refused messages neither tick (no empty poll) nor reset the clock: junk every 0.2 s used to keep a role
    waiting past its limit for ever. Past the limit since the last message taken, the next refusal raises."""
    now = [100.0]
    monkeypatch.setattr(transport.time, "monotonic", lambda: now[0])
    clock = transport.IdleClock("layer 3", 1000)
    for _ in range(4):  # 0.8 s of junk
        now[0] += 0.2
        clock.rejected()
    clock.reset()  # a message taken
    now[0] += 0.9
    clock.rejected()
    now[0] += 0.2
    with pytest.raises(transport.PeerTimeout, match="layer 3: nothing but refused messages for 1s"):
        clock.rejected()


@pytest.mark.timeout(30)
def test_what_comes_after_the_stop_is_read_and_counted_and_a_flood_cannot_hold_the_role():
    import threading

    from ffpipe.wire import Rejections

    ctx = zmq.Context()
    topo = Topology.local(1)
    inbox = transport.pull(ctx, topo.layers[0].bind_url("127.0.0.1"))
    peer, stranger = (transport.push(ctx, topo.layers[0].connect_url(), linger_ms=0) for _ in range(2))
    try:
        transport.send(peer, Message("stop", 9, 0, {}), 2000)  # a resent stop: expected
        transport.send(peer, Message("heartbeat", 0, 0, {}), 2000)
        for _ in range(3):
            stranger.send_multipart([b"\x00garbage"])
            transport.send(stranger, Message("train", 1, 0, {"batch": 1}, {"x": torch.ones(2, 3)}), 2000)
        rejected = Rejections("layer 0")
        transport.reject_the_rest(inbox, rejected, expected=("stop", "heartbeat"), quiet_ms=2000)
        assert rejected.total() == 6 and rejected["after the stop: a 'train' message"] == 3, rejected
        assert transport.recv(inbox, 0) is None  # all of it read

        flooding = threading.Event()
        flooding.set()

        def flood():
            while flooding.is_set():
                try:
                    transport.send_nowait(stranger, Message("train", 1, 0, {}, {}))
                except transport.PeerTimeout:  # its queue is full: the reader is behind
                    pass

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        try:
            transport.reject_the_rest(inbox, Rejections("layer 0"), expected=(), limit_s=0.5)  # returns: no hang
        finally:
            flooding.clear()
            thread.join(timeout=5)
        while transport.recv(inbox, 200) is not None:  # what the flood left queued
            pass

        beating = threading.Event()
        beating.set()

        def beat():  # heartbeats, as fast as they go: they must not keep the role reading until limit_s
            while beating.is_set():
                try:
                    transport.send_nowait(peer, Message("heartbeat", 0, 0, {}))
                except transport.PeerTimeout:  # its queue is full
                    pass

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            rejected = Rejections("sink")
            transport.reject_the_rest(inbox, rejected, expected=("heartbeat",), limit_s=120)  # past the test's timeout
            assert rejected.total() == 0
        finally:
            beating.clear()
            thread.join(timeout=5)
    finally:
        for sock in (inbox, peer, stranger):
            sock.close(linger=0)
        ctx.term()
