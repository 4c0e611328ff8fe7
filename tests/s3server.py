"""A real S3-compatible HTTP server for the tests: moto's server mode (``moto[server]``,
in the test extra) in a subprocess on 127.0.0.1, behind a TCP relay the tests can cut
and restore (an S3 service going down and coming back, with its data kept). Started
once per test session; every test gets a bucket of its own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Relay:
    """Forwards 127.0.0.1:<port> to the server; ``cut()`` closes every connection and
    refuses new ones, ``restore()`` listens again on the same port."""

    def __init__(self, target: int):
        self.target = target
        self.port = _free_port()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._trip: tuple[bytes, int] | None = None  # cut once this many requests passed
        self._stall: threading.Event | None = None
        self.restore()

    def cut_after(self, pattern: bytes, n: int) -> None:
        """Cut (as ``cut()``) as soon as the ``n``-th request whose request line holds
        ``pattern`` (e.g. ``b"PUT /"``) has been forwarded: a service that goes down in
        the middle of a write, at a point that does not depend on timing."""
        self._trip = (pattern, n)
        self._stall = None

    def stall_after(self, pattern: bytes, n: int) -> threading.Event:
        """Hold back the ``n``-th request matching ``pattern`` (and all after it on that
        connection) until the returned event is set: a writer stopped in the middle of
        a write, with what it put before still stored."""
        self._trip = (pattern, n)
        self._stall = threading.Event()
        return self._stall

    def restore(self) -> None:
        if self._listener is not None:
            return
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(128)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def cut(self) -> None:
        ls, self._listener = self._listener, None
        if ls is not None:
            try:
                ls.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            ls.close()
        with self._lock:
            for c in list(self._conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                trip = self._trip
                if upstream and trip is not None:
                    hits = sum(1 for line in data.split(b"\r\n")
                               if line.startswith((b"PUT ", b"GET ", b"POST ", b"DELETE ",
                                                   b"HEAD ")) and trip[0] in line)
                    if hits:
                        with self._lock:
                            left = trip[1] - hits
                            self._trip = (trip[0], left) if left > 0 else None
                        if left <= 0:
                            if self._stall is None:
                                self.cut()
                                break
                            self._stall.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._conns.discard(src)


class S3Server:
    access_key = "tdstore-test"
    secret_key = "tdstore-test-secret"
    region = "us-east-1"

    def __init__(self) -> None:
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.relay: _Relay | None = None

    def start(self) -> S3Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/moto-api/", timeout=2)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)
        self.relay = _Relay(self.port)
        return self

    def new_relay(self) -> _Relay:
        """Another way in to the same server (a host of its own, to cut or stall)."""
        return _Relay(self.port)

    @property
    def endpoint(self) -> str:
        assert self.relay is not None
        return f"http://127.0.0.1:{self.relay.port}"

    def env(self) -> dict[str, str]:
        """The standard variables a user sets for an S3-compatible service."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region,
                "AWS_ALLOW_HTTP": "true"}

    def new_bucket(self) -> str:
        name = f"tdstore-{uuid.uuid4().hex[:12]}"
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/{name}", method="PUT")
        urllib.request.urlopen(req, timeout=10).close()
        return name

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object in ``bucket`` (read directly from the server, not through
        tdstore), for tests that compare or tamper with what is stored."""
        import obstore
        from obstore.store import S3Store

        st = S3Store(bucket, endpoint=f"http://127.0.0.1:{self.port}",
                     access_key_id=self.access_key, secret_access_key=self.secret_key,
                     region=self.region, client_options={"allow_http": True})
        out = {}
        for batch in obstore.list(st):
            for o in batch:
                out[o["path"]] = bytes(obstore.get(st, o["path"]).bytes())
        return out

    def raw_store(self, bucket: str):
        from obstore.store import S3Store

        return S3Store(bucket, endpoint=f"http://127.0.0.1:{self.port}",
                       access_key_id=self.access_key, secret_access_key=self.secret_key,
                       region=self.region, client_options={"allow_http": True})

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.cut()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def env_with(server: S3Server, **extra: str) -> dict[str, str]:
    return {**os.environ, **server.env(), **extra}
