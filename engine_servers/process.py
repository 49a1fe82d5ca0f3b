"""One server process that this process starts on 127.0.0.1 and alone stops.

    with ServerProcess("sglang", argv, env=env, port=port, log_path=log) as server:
        server.wait_ready("/health", timeout=300)     # raises, with the log's tail, if it dies
        ...                                           # server.url

The server runs in a session of its own, so its pid is also its process group's id: `stop`
signals that group (the server and every worker it forked), SIGTERM then SIGKILL after a bound,
and reaps it. Every exit path stops it: the `with` block, `stop()` from a fixture's finalizer,
`atexit` (a normal interpreter exit, and SIGTERM / SIGHUP, turned into one), and, should this
process be killed outright, the kernel's parent-death signal to the server.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

HOST = "127.0.0.1"
_RUNNING: dict[int, ServerProcess] = {}


class ServerDied(RuntimeError):
    """The server exited, or never answered within its bound; the message ends with its log."""


def free_port(low: int = 20000, high: int = 45000, also: Sequence[int] = ()) -> int:
    """A port in [low, high) free on 127.0.0.1, with `port + offset` free for each offset in
    `also` (SGLang opens its gRPC port at `--port` + 10000)."""
    for _ in range(200):
        port = random.randrange(low, high)
        if all(_bindable(port + offset) for offset in (0, *also)):
            return port
    raise RuntimeError(f"no free port in [{low}, {high}) on {HOST}")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:  # in the child (a session leader already), before exec
    try:  # Linux: SIGTERM to the server when the process that started it dies
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ServerProcess:
    """A server started with `argv` and `env`, answering HTTP at `url` (127.0.0.1:`port`); its
    stdout and stderr go to `log_path`."""

    def __init__(self, name: str, argv: Sequence[str], *, env: Mapping[str, str], port: int,
                 log_path: str | os.PathLike, cwd: str | os.PathLike | None = None):
        self.name, self.argv, self.env, self.port = name, list(argv), dict(env), port
        self.log_path, self.cwd = str(log_path), cwd
        self.url = f"http://{HOST}:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        if self.proc is not None:
            raise RuntimeError(f"{self.name} server already started (pid {self.proc.pid})")
        _stop_all_on_exit()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        _RUNNING[self.proc.pid] = self
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, path: str = "/health", timeout: float = 300.0,
                   interval: float = 1.0) -> float:
        """Poll `GET path` until it answers 200; return the seconds it took. Raises
        `ServerDied` if the server exits first or `timeout` passes (then stopping it)."""
        start = time.monotonic()
        while True:
            if not self.alive():
                code = None if self.proc is None else self.proc.returncode
                raise ServerDied(f"{self.name} server exited with status {code} before "
                                 f"answering {path}\n{self.log_tail()}")
            if self.get_status(path) == 200:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                self.stop()
                raise ServerDied(f"{self.name} server did not answer {path} within "
                                 f"{timeout:.0f} s (stopped)\n{self.log_tail()}")
            time.sleep(interval)

    def get_status(self, path: str, timeout: float = 5.0) -> int | None:
        """The HTTP status of `GET path`, or None if nothing answers."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except (OSError, ValueError):
            return None

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM to the server's process group, SIGKILL after `grace` seconds; reap it.
        Idempotent. Returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        _RUNNING.pop(proc.pid, None)
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=grace)
        # workers the server forked into its group may outlive it: the group goes too
        _signal_group(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + grace
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                text = f.readlines()[-lines:]
        except OSError:
            return f"(no log at {self.log_path})"
        return f"--- last {len(text)} lines of {self.log_path} ---\n" + "".join(text)

    def __enter__(self) -> ServerProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_all() -> None:
    """Stop every server this process started and has not stopped."""
    for server in list(_RUNNING.values()):
        server.stop(grace=10.0)


_HOOKED = False


def _stop_all_on_exit() -> None:
    """At the first start: `stop_all` at interpreter exit, and SIGTERM / SIGHUP (if nobody else
    handles them) turned into that exit, so a CI timeout or a closed terminal stops the servers."""
    global _HOOKED
    if _HOOKED:
        return
    _HOOKED = True
    atexit.register(stop_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread: atexit still holds
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _exit_on_signal)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)
