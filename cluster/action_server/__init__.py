"""The reference action server: the webhook coact's action executor POSTs ``ActionCall`` bodies to.

It keeps a demo bank's state (one card per session, escalation tickets) in SQLite and answers each call
with an ``ActionOutcome``; a retried call (same idempotency key) gets the first answer back, with no second
effect. ``state`` is the storage (stdlib only), ``app`` the FastAPI app, ``process`` starts it as a
subprocess (tests, ``make serve``); ``python -m coact.cluster.action_server`` runs it by hand.
"""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8100
DEFAULT_DB_PATH = "var/action_server.sqlite"
TOKEN_ENV = "COACT_ACTION_TOKEN"
