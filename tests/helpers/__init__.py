"""What the test modules share besides fixtures (those are in tests/conftest.py).

- `sse`: a server-sent-events client for streamed turns, and the protocol check of one streamed turn;
- `serve`: plain turns over HTTP, handles to a running app's deployments, waiting for a condition;
- `notebooks`: run a notebook from notebooks/ in a fresh kernel;
- `data`: the shared data folder, which must be present in CI (CI=true) and may be absent elsewhere.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
