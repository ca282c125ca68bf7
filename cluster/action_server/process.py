"""Start the reference action server as a subprocess and stop it by its PID (tests, ``make serve``).

The server runs in its own process session, so a Ctrl-C meant for the caller's terminal doesn't reach it
and stopping it never needs a name-based kill. State lives in the SQLite file, so a server stopped and
started again on the same ``db_path`` carries on where it was (tickets, cards, idempotency keys).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

from coact.cluster.action_server import DEFAULT_DB_PATH, DEFAULT_HOST, TOKEN_ENV
from coact.cluster.runtime import free_port


class ActionServerProcess:
    """A running ``python -m coact.cluster.action_server``; a context manager that stops it on exit."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, db_path: Path, log: IO[bytes]) -> None:
        self._proc, self._log = proc, log
        self.port, self.db_path = port, db_path
        self.url = f"http://{DEFAULT_HOST}:{port}"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's stdout+stderr (read once it has exited, or while it runs)."""
        # pread leaves the file offset alone: the server shares it and must keep appending where it was.
        fd = self._log.fileno()
        size = os.fstat(fd).st_size
        start = max(0, size - 4 * chars)
        return os.pread(fd, size - start, start).decode(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 10) -> int | None:
        """SIGTERM, then SIGKILL if it hasn't exited within ``timeout_s``; the exit code (idempotent)."""
        if self._proc.poll() is None:
            try:
                self._proc.send_signal(signal.SIGTERM)
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=timeout_s)
        return self._proc.returncode

    def close(self) -> None:
        self.stop()
        self._log.close()

    def __enter__(self) -> ActionServerProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ActionServerProcess(url={self.url!r}, pid={self.pid}, db_path={str(self.db_path)!r})"


def start_action_server(port: int | None = None, db_path: str | Path | None = None, token: str | None = None,
                        timeout_s: float = 30) -> ActionServerProcess:
    """Start the server on 127.0.0.1 (a free port if ``port`` is None) and return once /healthz answers.

    ``db_path`` defaults to ./var/action_server.sqlite. ``token`` None means no auth, even if the caller's
    environment has $COACT_ACTION_TOKEN. Raises RuntimeError with the server's output if it exits or doesn't
    answer within ``timeout_s``.
    """
    port = free_port() if port is None else port
    db = Path(db_path if db_path is not None else DEFAULT_DB_PATH).resolve()
    env = dict(os.environ)
    env.pop(TOKEN_ENV, None)
    if token is not None:
        env[TOKEN_ENV] = token  # by environment, not argv: argv is visible to every user in `ps`
    # An unnamed file, not a pipe: a pipe nobody reads would block a chatty server.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "coact.cluster.action_server", "--host", DEFAULT_HOST,
                             "--port", str(port), "--db", str(db)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    server = ActionServerProcess(proc, port, db, log)
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while True:
            if proc.poll() is not None:
                tail = server.log_tail()
                log.close()
                raise RuntimeError(f"action server exited with code {proc.returncode} before answering "
                                   f"/healthz on port {port}:\n{tail}")
            try:
                answer = client.get(f"{server.url}/healthz")
                # The pid check: an older server still on that port must not pass for this one.
                if answer.status_code == 200 and answer.json().get("pid") == proc.pid:
                    return server
            except (httpx.HTTPError, ValueError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                server.stop()
                tail = server.log_tail()
                log.close()
                raise RuntimeError(f"action server did not answer /healthz on port {port} within "
                                   f"{timeout_s:g}s:\n{tail}")
            time.sleep(0.05)
