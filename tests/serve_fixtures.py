"""A real posttrain server for tests: uvicorn in a thread on a free loopback port, stopped afterwards."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(settings):
    """Yields (state, base URL) while a server built from `settings` (a config.ServeConfig) answers."""
    import uvicorn

    from posttrain.serve.app import create_app
    from posttrain.serve.server import build_state

    state = build_state(settings)  # its engine thread started
    uv = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=settings.port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield state, f"http://127.0.0.1:{settings.port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        state.worker.stop()
