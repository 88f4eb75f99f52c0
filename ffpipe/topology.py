"""Where each role of a pipeline receives: the address table every process is given.

  source --> layer 0 --> layer 1 --> ... --> layer L-1 --> sink
     ^                                                      |
     +------------------ beliefs (hard negatives) ----------+

Each role binds its own receiving address on `bind_host` (loopback unless told otherwise) and connects to
the next role's address.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from ffpipe.security import Keys
from ffpipe.transport import Endpoint


@dataclass(frozen=True)
class Topology:
    source: Endpoint  # the source receives beliefs from the sink here
    layers: tuple[Endpoint, ...]  # layer i receives batches here
    sink: Endpoint  # the sink receives the last layer's output here
    bind_host: str = "127.0.0.1"
    keys: Keys | None = None  # CURVE keys of every link (None: plain TCP, for loopback and trusted networks)

    def downstream(self, index: int) -> Endpoint:
        """Where layer `index` sends: the next layer, or the sink after the last."""
        return self.layers[index + 1] if index + 1 < len(self.layers) else self.sink

    @classmethod
    def parse(cls, source: str, layers: str, sink: str, bind_host: str = "127.0.0.1", keys: Keys | None = None) -> Topology:
        parts = [p for p in layers.split(",") if p.strip()]
        if not parts:
            raise ValueError("--layer-addrs must list one host:port per layer")
        return cls(Endpoint.parse(source), tuple(Endpoint.parse(p) for p in parts), Endpoint.parse(sink), bind_host, keys)

    @classmethod
    def local(cls, num_layers: int, host: str = "127.0.0.1", keys: Keys | None = None) -> Topology:
        """Free loopback ports for a one-machine run."""
        ports = free_ports(num_layers + 2, host)
        return cls(Endpoint(host, ports[0]), tuple(Endpoint(host, p) for p in ports[1:-1]), Endpoint(host, ports[-1]), host, keys)

    def as_flags(self) -> list[str]:
        flags = ["--source-addr", str(self.source), "--layer-addrs", ",".join(map(str, self.layers)),
                 "--sink-addr", str(self.sink), "--bind-host", self.bind_host]
        return flags + (["--keys", str(self.keys.folder)] if self.keys is not None else [])

    def to_dict(self) -> dict:
        return {"source": str(self.source), "layers": [str(e) for e in self.layers], "sink": str(self.sink),
                "bind_host": self.bind_host, "curve": self.keys is not None}


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports the OS says are free now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
