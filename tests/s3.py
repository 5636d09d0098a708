"""A real S3-compatible server for the tests: moto's server mode on 127.0.0.1, behind a TCP
proxy that a test can stop and start again (an endpoint that goes away and comes back while
the server keeps its objects)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time

ENDPOINT_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Proxy:
    """Forwards 127.0.0.1:``port`` to ``target``; :meth:`stop` refuses and cuts connections.
    With ``latency`` (seconds), every round trip waits that long: a request that follows an
    answer on its connection is held once before it is forwarded, however many packets carry
    it (a remote store's distance, for benchmarks/listing_scale.py). With ``refuse`` (a
    pattern of a request's bytes, e.g. ``rb"PUT /bucket/.*/x.json"``), a matching request is
    answered ``403 AccessDenied`` as S3 answers a write it does not allow, and counted in
    ``denied``; nothing of it reaches the store."""

    def __init__(self, target: int, latency: float = 0.0) -> None:
        self.target, self.port, self.latency = target, free_port(), latency
        self.refuse: re.Pattern[bytes] | None = None
        self.denied = 0
        self.answered: dict[socket.socket, bool] = {}  # client connection -> answered since
        self.down, self.refused = False, 0  # while down: connections accepted, then cut
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.start()

    def go_down(self) -> None:
        """Cut every open connection and every new one (counted in ``refused``) until
        :meth:`come_back`: the endpoint is there but answers nothing."""
        self.down = True
        with self._lock:
            for connection in list(self._open):
                with contextlib.suppress(OSError):
                    connection.close()
            self._open.clear()

    def come_back(self) -> None:
        self.down = False

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for connection in list(self._open):
                with contextlib.suppress(OSError):
                    connection.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self.down:
                self.refused += 1
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            inbound = source.getsockname()[1] == self.port  # a client's request, not the answer
            client = source if inbound else sink
            while data := source.recv(65536):
                if inbound and self.refuse is not None and self.refuse.search(data):
                    self.denied += 1
                    source.sendall(ACCESS_DENIED)
                    break
                if self.latency and inbound and self.answered.get(client, True):
                    time.sleep(self.latency)
                    self.answered[client] = False
                elif self.latency and not inbound:
                    self.answered[client] = True
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.close()


_DENIED_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                b"<Message>Access Denied</Message></Error>")  # fmt: skip
ACCESS_DENIED = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(_DENIED_BODY), _DENIED_BODY))  # fmt: skip


class S3Server:
    """moto_server on 127.0.0.1 and a proxy in front; :meth:`env` gives the standard AWS
    environment that reaches it (credentials are made up; the secret is random per run)."""

    def __init__(self) -> None:
        self.port = free_port()
        moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
        self.process = subprocess.Popen(
            [moto, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.time() + 60
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                break
            assert self.process.poll() is None and time.time() < deadline, (
                "moto_server did not start"
            )
            time.sleep(0.2)
        self.proxy = Proxy(self.port)
        self.secret = os.urandom(12).hex()

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "wf-test",
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.proxy.port}",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        """boto3's client of the server: it writes any key, as other tools do (pyarrow
        normalises keys such as ``a/./b`` on the way)."""
        import boto3

        env = self.env()
        return boto3.client(
            "s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )  # fmt: skip

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def filesystem(self):
        """The server as the tests' own client sees it (credentials given, not from the env)."""
        import pyarrow.fs as pafs

        env = self.env()
        return pafs.S3FileSystem(
            access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=f"127.0.0.1:{self.proxy.port}", scheme="http",
            region=env["AWS_DEFAULT_REGION"],
        )  # fmt: skip

    def upload(self, folder: str, uri: str) -> None:
        """Copy a local folder to ``s3://bucket/prefix`` through pyarrow, as a user's tool would."""
        import pyarrow.fs as pafs

        pafs.copy_files(folder, uri.removeprefix("s3://"), destination_filesystem=self.filesystem())

    def objects(self, prefix: str) -> list[str]:
        """Every object under ``bucket/prefix``."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(prefix, recursive=True, allow_not_found=True)
        infos = self.filesystem().get_file_info(selector)
        return [i.path for i in infos if i.type == pafs.FileType.File]

    def read(self, path: str) -> bytes:
        with self.filesystem().open_input_stream(path) as stream:
            return stream.read()

    def close(self) -> None:
        self.proxy.stop()
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        self.process.kill()
