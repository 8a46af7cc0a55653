"""A real HTTP shard server on 127.0.0.1 (a thread of the test) that can fail on purpose: ``serve(root)``."""

from __future__ import annotations

import contextlib
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator


class FaultyShardHandler(SimpleHTTPRequestHandler):
    """Files under the server's root, except: every path answers 503 while ``server.down`` is set, a file name in
    ``server.missing`` answers 404, the next ``server.fail_next.value`` GETs of a ``.tar`` answer 503 (an outage
    of a known length, counted in requests), and ``GET /stall/NAME`` sends the first 4 KiB of ``shards/NAME`` and then
    nothing until the test ends (``server.release``, at most 300 s); ``server.stalled`` says it began. While
    ``server.stall_next`` is set, the next GET of a ``.tar`` stalls so (once)."""

    def _fault(self) -> bool:
        name = self.path.rsplit("/", 1)[-1]
        if self.command == "GET" and name.endswith(".tar"):
            with self.server.fail_next.lock:
                if self.server.fail_next.value > 0:
                    self.server.fail_next.value -= 1
                    self.send_error(503)
                    return True
        if self.server.down.is_set() or name in self.server.missing:
            self.send_error(503 if self.server.down.is_set() else 404)
            return True
        return False

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        if not self._fault():
            super().do_HEAD()

    def do_GET(self):  # noqa: N802
        if self._fault():
            return
        if self.path.startswith("/stall/"):
            return self._stall(Path(self.directory) / "shards" / self.path[len("/stall/"):])
        if self.path.endswith(".tar") and self.server.stall_next.is_set():  # once: a transient stall
            self.server.stall_next.clear()
            return self._stall(Path(self.directory) / self.path.lstrip("/"))
        super().do_GET()

    def _stall(self, path: Path) -> None:
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:4096])
        self.wfile.flush()
        self.server.stalled.set()
        self.server.release.wait(300)

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client gone mid-transfer (a trainer killed on purpose) is expected here: no traceback."""


class _Counter:
    def __init__(self) -> None:
        self.value, self.lock = 0, threading.Lock()


@contextlib.contextmanager
def serve(root: Path) -> Iterator[tuple[str, ThreadingHTTPServer]]:
    """(base URL, server) serving ``root``; the server's ``down`` / ``missing`` / ``fail_next`` / ``stalled`` /
    ``release`` steer ``FaultyShardHandler``. Stopped (and any stall released) on exit."""
    httpd = _QuietServer(("127.0.0.1", 0), partial(FaultyShardHandler, directory=str(root)))
    httpd.daemon_threads = True
    httpd.down, httpd.stalled, httpd.release = threading.Event(), threading.Event(), threading.Event()
    httpd.stall_next = threading.Event()
    httpd.missing = set()
    httpd.fail_next = _Counter()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    finally:
        httpd.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=30)
