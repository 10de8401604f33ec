"""A real loopback HTTP server for remote-storage tests: ``http.server`` serving a folder on
127.0.0.1, which a test can take down mid-transfer (an outage) and bring back on the same port,
or make hang (a storage that accepts and never answers)."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        owner: ShardServer = self.server.owner
        owner.requests += 1
        if owner.hang:
            time.sleep(3600)
            return
        if owner.cut_next and self.path.endswith(".tar"):
            owner.cut_next = False
            self._send_half_then_go_down(owner)
            return
        super().do_GET()

    def _send_half_then_go_down(self, owner: ShardServer) -> None:
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        owner.cuts += 1
        threading.Thread(target=owner.outage, daemon=True).start()
        self.close_connection = True


class ShardServer:
    """``http.server`` on 127.0.0.1 serving ``folder``. ``cut_next``: the next shard request gets
    half its bytes, then the server is down for ``outage_s`` (connections refused) and comes back
    on the same port. ``hang``: requests are accepted and never answered."""

    def __init__(self, folder: Path, outage_s: float = 10.0):
        self.folder, self.outage_s = Path(folder), outage_s
        self.requests = self.cuts = 0
        self.cut_next = self.hang = False
        self.down_at: float | None = None
        self.up_again_at: float | None = None
        self._server = self._start(0)
        self.port = self._server.server_address[1]

    def _start(self, port: int) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(_Handler, directory=str(self.folder)))
        server.daemon_threads = True
        server.owner = self
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def outage(self) -> None:
        self.down_at = time.monotonic()
        self._server.shutdown()
        self._server.server_close()
        time.sleep(self.outage_s)
        self._server = self._start(self.port)
        self.up_again_at = time.monotonic()

    def close(self) -> None:
        self.hang = False
        with contextlib.suppress(OSError):
            self._server.shutdown()
            self._server.server_close()
