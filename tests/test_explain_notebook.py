"""notebooks/explain.ipynb runs top to bottom against the live app: the decisions it printed, one figure per
decision, the leave-one-out tables, and the token attributions (or, on an app without the route, the notice)."""

from __future__ import annotations

import re

import pytest

from tests.helpers.notebooks import run_notebook

pytestmark = pytest.mark.serve

DECISION = re.compile(r"^\s+decision: (\S+) \((\w+)\)$", re.M)


def test_explain_notebook_executes(app_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COACT_URL", app_url)
    run = run_notebook("explain.ipynb", monkeypatch, timeout_s=600)

    # The conversation: the clarifying question, then the freeze decided on the answer "yes".
    talk = run.text('for message in ["I see a payment I don\'t recognise", "yes"]')
    assert DECISION.findall(talk) == [("ask:q_someone_else", "ask"), ("freeze_card", "action")], talk
    assert re.search(r"^\s+reason: freeze_card has the highest expected utility", talk, re.M), talk

    # One five-panel figure per decision, and each decision's leave-one-out table.
    assert len(run.images("plot_decision(turn, f\"turn {i}\")")) == 2
    tables = run.text('display(pd.DataFrame(d.get("explanation") or []))')
    assert "turn 1: ask:q_someone_else" in tables and "turn 2: freeze_card" in tables
    assert "answer: q_someone_else=yes" in tables and "choice_without" in tables

    # Token attributions: coloured tokens, words with their sums, and a bar chart per message.
    attributions = run.text('r = httpx.post(f"{url}/v1/explain"')
    html = "".join(str(o.get("data", {}).get("text/html", "")) for o in run.cell('r = httpx.post(f"{url}/v1/explain"'))
    assert len(re.findall(r"[\"'].+[\"']: target \w+, delta [+-]\d", attributions, re.M)) == 2, attributions
    for total, logit, baseline in re.findall(r"attributions sum (\S+) = logit (\S+) - baseline (\S+)\)", attributions):
        assert abs(float(total) - (float(logit) - float(baseline))) < 0.01, attributions
    assert re.search(r"words: .*stole", attributions), attributions
    assert html.count("<span style=") >= 4 and "rgba(" in html
    assert len(run.images('ax.set_title(f"attributions towards')) == 1
