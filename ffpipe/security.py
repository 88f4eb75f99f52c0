"""CURVE encryption and authentication of pipeline links (ZeroMQ's CurveZMQ), for links that leave the machine.

`ffpipe keys DIR` writes two key pairs into DIR:
  server.key / server.key_secret   every role's receiving (bound) socket proves it holds this pair;
  client.key / client.key_secret   every sending (connecting) socket proves it holds this pair.
Roles started with `--keys DIR` encrypt every link, refuse connections from any peer whose public key is not
in DIR, and only connect to a peer that proves it holds the server key. A host without the secret files can
neither read the batches on the wire nor inject its own. Copy DIR to every host of the pipeline, over a channel
you trust; the `*.key_secret` files are written readable by their owner only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

PAIRS = ("server", "client")


@dataclass(frozen=True)
class Keys:
    folder: Path
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    def secure_server(self, sock: zmq.Socket) -> None:
        """A bound socket: encrypt, and hand every connecting peer to the authenticator (before bind)."""
        sock.curve_secretkey, sock.curve_publickey, sock.curve_server = self.server_secret, self.server_public, True

    def secure_client(self, sock: zmq.Socket) -> None:
        """A connecting socket: encrypt, prove the client key, and accept only the server key (before connect)."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey, sock.curve_secretkey = self.client_public, self.client_secret


def create(folder: str | Path, force: bool = False) -> Path:
    """Write both key pairs into `folder`; refuses to overwrite keys unless `force`."""
    if not zmq.has("curve"):
        raise ValueError("this libzmq was built without CURVE support")
    folder = Path(folder)
    existing = [folder / f"{name}{ext}" for name in PAIRS for ext in (".key", ".key_secret") if (folder / f"{name}{ext}").exists()]
    if existing and not force:
        raise ValueError(f"{existing[0]} exists; pass --force to replace the keys (every host then needs the new ones)")
    folder.mkdir(parents=True, exist_ok=True)
    for name in PAIRS:
        _, secret = zmq.auth.create_certificates(folder, name)
        os.chmod(secret, 0o600)
    return folder


def load(folder: str | Path) -> Keys:
    """Both key pairs from `folder`, or ValueError naming the missing or unreadable file."""
    folder = Path(folder)
    pairs = {}
    for name in PAIRS:
        path = folder / f"{name}.key_secret"
        if not path.is_file():
            raise ValueError(f"{path}: no such key file; create the keys with `ffpipe keys {folder}`")
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a CURVE key file ({e})") from None
        if not secret:
            raise ValueError(f"{path}: holds no secret key")
        pairs[name] = (public, secret)
    return Keys(folder, *pairs["server"], *pairs["client"])


def authenticator(ctx: zmq.Context, keys: Keys):
    """Start the ZAP handler that admits only peers whose public key is in the keys folder (the client's and
    the server's: every role is both). Stop it before terminating the context."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.folder))
    return auth
