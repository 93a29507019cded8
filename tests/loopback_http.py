"""A loopback HTTP server for download tests: serves a folder, honours ``Range: bytes=N-``, and records
each request's Range header (empty string when none). Never leaves 127.0.0.1."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files from its folder; a ``Range: bytes=N-`` request gets a 206 with the tail."""

    ranges: list[str]

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        header = self.headers.get("Range") or ""
        self.ranges.append(header)
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = int(header.split("=")[1].rstrip("-")) if header else 0
        self.send_response(206 if header else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@contextmanager
def serve_folder(root: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``root`` on a free loopback port; yields the base URL and the list of Range headers seen."""
    ranges: list[str] = []
    handler = partial(type("Handler", (RangeHandler,), {"ranges": ranges}), directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", ranges
    finally:
        httpd.shutdown()
        httpd.server_close()
