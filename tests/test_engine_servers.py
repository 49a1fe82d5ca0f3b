"""`engine_servers.process.ServerProcess`, engine-free (a small Python HTTP server stands in for
an engine): it waits for the server with a bound, stops the server and every worker it forked by
the pid it started, and a server that dies or never answers fails with its log."""

from __future__ import annotations

import os
import sys

import pytest

from engine_servers.process import ServerDied, ServerProcess, free_port

SERVER = """
import http.server, subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a worker it forks
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
print("serving", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def server(tmp_path, code: str, port: int | None = None) -> ServerProcess:
    port = port or free_port()
    return ServerProcess("stand-in", [sys.executable, "-c", code, str(port)], env=dict(os.environ),
                         port=port, log_path=tmp_path / "server.log")


def test_waits_then_stops_the_server_and_its_workers_by_pid(tmp_path):
    with server(tmp_path, SERVER) as running:
        assert running.url.startswith("http://127.0.0.1:")
        assert running.wait_ready("/health", timeout=60) < 60
        assert running.get_status("/missing") == 404
        pid = running.pid
        assert os.getpgid(pid) == pid  # its own process group: the workers are in it
        assert group_alive(pid)
    assert not running.alive()
    assert not group_alive(pid)  # the forked worker went with it
    assert running.stop() is not None  # idempotent


def test_a_server_that_dies_fails_with_its_status_and_log(tmp_path):
    dying = server(tmp_path, "print('cannot serve: no model'); raise SystemExit(3)").start()
    with pytest.raises(ServerDied, match="(?s)exited with status 3.*cannot serve: no model"):
        dying.wait_ready("/health", timeout=60)


def test_a_server_that_never_answers_is_stopped_at_the_bound(tmp_path):
    silent = server(tmp_path, "import time; print('starting', flush=True); time.sleep(600)")
    silent.start()
    with pytest.raises(ServerDied, match="(?s)did not answer /health within 2 s.*starting"):
        silent.wait_ready("/health", timeout=2, interval=0.2)
    assert not silent.alive()


def test_free_port_leaves_room_for_sglangs_second_port():
    port = free_port(also=(10000,))
    assert 20000 <= port < 45000  # SGLang's gRPC port, port + 10000, stays below 65536
