"""A loopback TCP relay that can be made to fail: the stand-in for Entra or Graph "going down".

A gateway started with ``--resolve login.microsoftonline.com=127.0.0.1:<relay port>`` reaches the
look-alike through the relay, so a test can take Entra (or Graph) away from that one gateway
without touching the look-alike the other tests share. Modes:

- ``forward``: pass bytes both ways to the target;
- ``stall``: accept and read, never answer (a server that hangs);
- ``reset``: accept, then close with a TCP reset (a server that drops connections);
- ``down``: nothing listens, so connections are refused (a server that is down); any other mode
  listens again, on the same port.

Switching mode closes the connections already open, so a client's pooled keep-alive connection
cannot keep reaching the target after it "went down".
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter

from .e2e import read_head


class Relay:
    def __init__(self, target: tuple[str, int] | None, mode: str = "forward") -> None:
        self.target = target
        self.mode = mode
        self.accepted: Counter[str] = Counter()  # connections accepted, by the mode they met
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self.port = 0
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._listen()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_mode(self, mode: str, target: tuple[str, int] | None = None) -> None:
        """``forward`` (to ``target``, if given), ``stall``, ``reset``, or ``down``: nothing listens."""
        assert mode in ("forward", "stall", "reset", "down"), mode
        with self._lock:
            self.mode = mode
            if target is not None:
                self.target = target
            doomed, self._open = self._open, set()
        for s in doomed:
            _close(s)
        if mode == "down":
            self._unlisten()
        elif self._listener is None:
            self._listen()  # back up, on the same port

    def held(self) -> int:
        """Connections open right now (a stalled fetch in flight shows here)."""
        with self._lock:
            return len(self._open)

    def stop(self) -> None:
        self.set_mode("down")

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _listen(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, args=(self._listener,),
                                        name=f"relay:{self.port}", daemon=True)
        self._thread.start()

    def _unlisten(self) -> None:
        if self._listener is not None:
            _close(self._listener)
            self._thread.join(timeout=5)
            self._listener = self._thread = None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                mode = self.mode
                self.accepted[mode] += 1
            if mode == "reset":
                # SO_LINGER 0: close() sends RST instead of FIN.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            with self._lock:
                self._open.add(client)
            if mode == "stall":
                threading.Thread(target=self._drain, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                self._forget(client)
                continue
            with self._lock:
                self._open.add(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _drain(self, s: socket.socket) -> None:
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
        self._forget(s)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        self._forget(src)
        self._forget(dst)

    def _forget(self, s: socket.socket) -> None:
        with self._lock:
            self._open.discard(s)
        _close(s)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


class MuteServer:
    """A TLS server that completes the handshake and reads the request, then answers nothing
    (``silent``) or only the start of a response (``trickle``: headers and a few bytes of a body
    it never finishes): the stand-in for an upstream that hangs once connected. Or it answers
    ``200`` with a JSON body of ``size`` bytes (``huge``), or a small one after ``delay`` seconds
    (``slow``: a request still in flight). ``requests`` counts the requests read."""

    def __init__(self, cert: str, key: str, behaviour: str = "silent", size: int = 0, delay: float = 0) -> None:
        import ssl

        assert behaviour in ("silent", "trickle", "huge", "slow"), behaviour
        self.behaviour = behaviour
        self.size = size
        self.delay = delay
        self.requests = 0
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name=f"mute:{self.port}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        _close(self._listener)
        self._thread.join(timeout=5)
        for s in self._held:
            _close(s)

    def __enter__(self) -> MuteServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(raw)
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            s = self._context.wrap_socket(raw, server_side=True)
            self._held.append(s)
            if b"\r\n\r\n" not in read_head(s):
                return
            self.requests += 1
            if self.behaviour == "huge":
                body = b'{"value":"' + b"x" * (self.size - 12) + b'"}'
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)
            elif self.behaviour == "slow":
                time.sleep(self.delay)
                body = b'{"value": [], "slow": true}'
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)
            elif self.behaviour == "trickle":
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                          b'{"value": [')
            while s.recv(65536):
                pass
        except OSError:
            pass
