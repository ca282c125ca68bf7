"""Run the reference action server: ``python -m coact.cluster.action_server [--host] [--port] [--db] [--token]``.

The token may come from ``COACT_ACTION_TOKEN`` instead of ``--token`` (keeps it out of the process list).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from coact.cluster.action_server import DEFAULT_DB_PATH, DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coact.cluster.action_server",
                                     description="coact's reference action server (the executor's webhook)")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--db", type=Path, default=Path(DEFAULT_DB_PATH),
                        help=f"SQLite file (default ./{DEFAULT_DB_PATH}; its folder is created)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                        help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV}, else none)")
    args = parser.parse_args(argv)

    # Imported here so --help answers without loading the web stack.
    import uvicorn

    from coact.cluster.action_server.app import create_app

    args.db.parent.mkdir(parents=True, exist_ok=True)
    app = create_app(args.db, token=args.token)
    # A short graceful shutdown: SIGTERM from ActionServerProcess.stop() should not wait on idle keep-alives.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)


if __name__ == "__main__":
    main()
