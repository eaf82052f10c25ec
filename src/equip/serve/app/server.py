"""uvicorn serving the app on a socket equip binds itself: a port that is taken is one line
from the command (uvicorn would log it and exit), and port 0 picks a free one and says which."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from equip.errors import EquipError


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        reason = e.strerror or str(e)
        raise EquipError(
            f"host={host} port={port}: cannot listen there ({reason}); give another port= "
            "(port=0 picks a free one)"
        ) from None


class AppServer:
    """One uvicorn server for the app on `sock`: `run()` in this thread until Ctrl-C, or
    `start()` in a thread of its own and `stop()`."""

    def __init__(self, app: Any, sock: socket.socket) -> None:
        import uvicorn

        self.sock = sock
        host, port = sock.getsockname()[:2]
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=5)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self, timeout_s: float = 30) -> AppServer:
        self._thread = threading.Thread(target=self.run, name="equip-app", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        # uvicorn sets `started` and offers nothing to wait on
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError(f"the app did not start at {self.url}")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.sock.close()
