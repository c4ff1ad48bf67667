"""Real Git over HTTP for tests: `git http-backend` (git's own smart-HTTP server, as a CGI) behind a
small Python HTTP server that wants basic auth with a token, the way GitHub takes
`x-access-token:<token>`; and a listener that accepts connections and never answers, for hangs."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class GitHttpServer:
    """Serves every bare repository under `root` at `http://127.0.0.1:<port>/<name>.git`.

    Requests without `Authorization: Basic base64(<user>:<token>)` get 401, as a real forge answers;
    `requests` counts what was served and `refused` what was refused."""

    def __init__(self, root: Path, token: str, user: str = "x-access-token") -> None:
        self.root = Path(root)
        self.expected = "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()
        self.requests = 0
        self.refused = 0
        self.pushes = 0
        # Set: every request is accepted and never answered (until cleared or the server stops).
        self.hang = threading.Event()
        # True: the first push that succeeds sets `hang`, so Git goes silent right after a commit lands.
        self.hang_after_push = False
        self.hung = 0
        self._closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                self._cgi()

            def do_POST(self) -> None:
                self._cgi()

            def _cgi(self) -> None:
                if server.hang.is_set():
                    server.hung += 1
                    while server.hang.is_set() and not server._closing.wait(0.1):
                        pass
                    self.close_connection = True
                    return
                if self.headers.get("Authorization") != server.expected:
                    server.refused += 1
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="git"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                server.requests += 1
                path, _, query = self.path.partition("?")
                body = self._body()
                env = {
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "GIT_PROJECT_ROOT": str(server.root),
                    "GIT_HTTP_EXPORT_ALL": "1",
                    "REQUEST_METHOD": self.command,
                    "PATH_INFO": path,
                    "QUERY_STRING": query,
                    "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                    "CONTENT_LENGTH": str(len(body)),
                    # http-backend enables receive-pack (push) only for an authenticated user.
                    "REMOTE_USER": "x-access-token",
                    "REMOTE_ADDR": self.client_address[0],
                    "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                    "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
                }
                res = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True,  # noqa: S607
                                     timeout=60, check=False)
                head, _, payload = res.stdout.partition(b"\r\n\r\n")
                if not _:
                    head, _, payload = res.stdout.partition(b"\n\n")
                status = 200
                headers = []
                for line in head.decode("latin-1").splitlines():
                    k, _, v = line.partition(":")
                    if k.lower() == "status":
                        status = int(v.split()[0])
                    elif k:
                        headers.append((k, v.strip()))
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                if path.endswith("/git-receive-pack") and status == 200:
                    server.pushes += 1
                    if server.hang_after_push:
                        server.hang.set()

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def __enter__(self) -> GitHttpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()


class HangingListener:
    """A TCP listener on 127.0.0.1 that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def _accept(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)  # held open, never answered

    def __enter__(self) -> HangingListener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for c in self._held:
            c.close()
        self._sock.close()
