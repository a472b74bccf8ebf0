"""What the tests' HTTP servers on 127.0.0.1 share: one way to send a whole answer, and a local Hugging Face hub."""
from __future__ import annotations

import hashlib
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def send_body(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str = "application/json",
          headers: dict[str, str] | None = None) -> None:
    """Send ``body`` with its status, content type, length and any extra ``headers``."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class LocalHub:
    """A Hugging Face hub on 127.0.0.1 (set ``HF_ENDPOINT`` to :attr:`endpoint`) serving files of
    model repositories the way huggingface.co serves LFS files: ``HEAD``/``GET``
    ``/{repo_id}/resolve/{revision}/{filename}`` answers 302 to a CDN address on this server with
    ``X-Repo-Commit``, ``X-Linked-Etag`` (the file's sha256) and ``X-Linked-Size``; the CDN
    (``/cdn/{sha256}``) answers 200 or, for a ``Range`` request, 206 with ``Content-Range``.

    Every request is recorded (:attr:`requests`: method, path, headers) and every TCP connection
    counted (:attr:`connections`). ``drop_gets`` makes that many next CDN GETs send the full
    length in their headers, half the bytes, then close the connection (a download cut off).
    """

    def __init__(self, files: dict[tuple[str, str], bytes], commit: str = "a" * 40) -> None:
        self.files = dict(files)
        self.commit = commit
        self.blobs = {hashlib.sha256(data).hexdigest(): data for data in self.files.values()}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.connections = 0
        self.drop_gets = 0
        self.lock = threading.Lock()
        hub = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request, client_address) -> bool:  # noqa: ANN001 (socketserver's API)
                with hub.lock:
                    hub.connections += 1
                return True

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet test output
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        with self.lock:
            self.requests.append((handler.command, path, dict(handler.headers.items())))
        if path.startswith("/cdn/"):
            self._send_blob(handler, path[len("/cdn/"):], body)
            return
        repo_id, _, rest = path.lstrip("/").partition("/resolve/")
        revision, _, filename = rest.partition("/")
        if not any(repo == repo_id for repo, _ in self.files) or revision not in ("main", self.commit):
            send_body(handler, 404, b'{"error": "Repository not found"}', headers={"X-Error-Code": "RepoNotFound"})
            return
        data = self.files.get((repo_id, filename))
        if data is None:
            send_body(handler, 404, b'{"error": "Entry not found"}',
                      headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": self.commit})
            return
        digest = hashlib.sha256(data).hexdigest()
        send_body(handler, 302, b"", content_type="text/plain", headers={
            "Location": f"{self.endpoint}/cdn/{digest}", "X-Repo-Commit": self.commit,
            "X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(data)), "ETag": f'"{digest[:40]}"'})

    def _send_blob(self, handler: BaseHTTPRequestHandler, digest: str, body: bool) -> None:
        data = self.blobs.get(digest)
        if data is None:
            send_body(handler, 404, b"no such blob", content_type="text/plain")
            return
        start, status = 0, 200
        headers = {"ETag": f'"{digest}"', "Accept-Ranges": "bytes"}
        wanted = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range", ""))
        if wanted:
            start, status = int(wanted.group(1)), 206
            if start >= len(data):
                send_body(handler, 416, b"", content_type="text/plain",
                          headers={"Content-Range": f"bytes */{len(data)}"})
                return
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        part = data[start:]
        if not body:
            handler.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(part))}.items():
                handler.send_header(name, value)
            handler.end_headers()
            return
        with self.lock:
            drop = self.drop_gets > 0
            self.drop_gets -= 1 if drop else 0
        if not drop:
            send_body(handler, status, part, content_type="application/octet-stream", headers=headers)
            return
        handler.send_response(status)  # the full length announced, half of it sent, then the line drops
        for name, value in {**headers, "Content-Type": "application/octet-stream",
                            "Content-Length": str(len(part))}.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(part[: len(part) // 2])
        handler.wfile.flush()
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)


class StallServer:
    """A server on 127.0.0.1 that accepts connections and never finishes an answer: ``drip``
    sends a 200 head announcing a long body, then one byte (``byte``) a second; otherwise it reads
    the request and says nothing. ``url`` ends with ``path``; ``connections`` counts the accepted ones."""

    def __init__(self, drip: bool, path: str = "/", content_type: str = "application/json",
                 byte: bytes = b" ", length: int = 100_000) -> None:
        self.drip, self.byte = drip, byte
        self.head = (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {length}\r\n\r\n").encode()
        self.connections = 0
        self.stopped = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}{path}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(1 << 16)
                if self.drip:
                    conn.sendall(self.head)
                while not self.stopped.wait(1.0):
                    if self.drip:
                        conn.sendall(self.byte)
            except OSError:
                return

    def close(self) -> None:
        """Stop accepting and end every answer."""
        self.stopped.set()
        self.sock.close()
