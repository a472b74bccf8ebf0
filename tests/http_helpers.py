"""What the tests' HTTP servers on 127.0.0.1 share: one way to send a whole answer."""
from __future__ import annotations

from http.server import BaseHTTPRequestHandler


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
