"""notebooks/quickstart.ipynb runs top to bottom against the live app and shows what the policy did."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.notebooks import run_notebook

pytestmark = pytest.mark.serve

ACTION = re.compile(r"^\s*\[(\w+): ([^\]]+)\]$", re.M)  # a turn's printed `[kind: name]`


def test_quickstart_notebook_executes(app_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COACT_URL", app_url)
    run = run_notebook("quickstart.ipynb", monkeypatch, timeout_s=600)
    # The first session, turn by turn: a question, the freeze decided on the answer "yes", then thanks.
    first = run.text('for message in ["I see a payment I don\'t recognise", "yes", "thanks"]')
    assert ACTION.findall(first) == [("ask", "ask:q_someone_else"), ("action", "freeze_card"),
                                     ("chitchat", "thanks")], first
    # The second decision explained: the answer it used and the action it chose (not a runner-up in the reason).
    explained = run.text('print("answered:", decision2.get("answered")')
    assert explained.startswith("answered: q_someone_else=yes -> freeze_card\n"), explained
    assert re.search(r"^freeze_card has the highest expected utility", explained, re.M), explained
    assert run.images()  # the posterior / expected-utility plots
