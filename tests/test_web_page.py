"""The decision page at `GET /`, in a real headless browser (Debian's chromium driven by its chromedriver).

A banking conversation is typed into the page of the shared app (LM replies, so tokens stream). The test
reads the raw SSE bytes itself (a tee of the page's fetch body, parsed here, not by the page) and checks that
the page showed tokens before the turn's `done` left the server, and that every number of the decision panel
equals the wire's trace exactly. Then the session list, "start over" and the explain link.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.data import in_ci, require_module
from tests.helpers.serve import wait_for

pytestmark = pytest.mark.serve

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CONVERSATION = ["I see a payment on my card I do not recognise", "yes"]
TURN_TIMEOUT_S = 240
# Without the networking flags chromium keeps trying to reach Google and stalls on a closed network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000"]

# Test-side instrumentation, installed before any message is sent: a copy of every /v1/chat body as it
# arrived, and snapshots of each turn whenever the chat changes (a page that waited for the whole reply
# would never show a bubble with text while its turn is not done).
INSTRUMENT = """
window.__raw = []; window.__rawDone = []; window.__snaps = [];
const realFetch = window.fetch.bind(window);
window.fetch = async (url, opts) => {
  const resp = await realFetch(url, opts);
  if (!String(url).endsWith('/v1/chat') || !resp.body) return resp;
  const [mine, theirs] = resp.body.tee();
  const i = window.__raw.length; window.__raw.push(''); window.__rawDone.push(false);
  (async () => { const r = theirs.getReader(); const d = new TextDecoder();
    for (;;) { const {value, done} = await r.read(); if (done) break; window.__raw[i] += d.decode(value, {stream: true}); }
    window.__rawDone[i] = true; })();
  return new Response(mine, {status: resp.status, headers: resp.headers});
};
new MutationObserver(() => {
  for (const t of document.querySelectorAll('.turn')) {
    const b = t.querySelector('.bubble.assistant .text');
    window.__snaps.push({turn: +t.dataset.turn, state: t.dataset.state, chars: b ? b.textContent.length : 0,
                         at: Date.now() / 1000});
  }
}).observe(document.querySelector('#chat'), {childList: true, subtree: true, characterData: true, attributes: true});
"""

# Everything the panel of turn `arguments[0]` shows, read from its data-value attributes.
READ_PANEL = """
const t = document.querySelector(`.turn[data-turn="${arguments[0]}"]`);
const rows = (sel, key) => [...t.querySelectorAll(sel)].map(r => [key ? r.getAttribute(key) : null,
  r.querySelector('.num').getAttribute('data-value')]);
return {
  state: t.dataset.state, firstTokenAt: t.dataset.firstTokenAt || null, doneSentAt: t.dataset.doneSentAt || null,
  user: t.querySelector('.bubble.user .text').textContent,
  reply: t.querySelector('.bubble.assistant .text').textContent,
  action: t.querySelector('.action-name').getAttribute('data-action'),
  intent: rows('.intent-row', 'data-label'),
  findings: rows('.finding-row', 'data-finding'),
  posterior: [...t.querySelectorAll('.posterior-row')].map(r => [r.dataset.variable, r.dataset.state,
    r.querySelector('.num').getAttribute('data-value')]),
  eu: rows('.eu-row', 'data-action'),
  chosen: [...t.querySelectorAll('.eu-row.chosen')].map(r => r.dataset.action),
  voi: rows('.voi-row', 'data-question'),
  influence: [...t.querySelectorAll('.influence-row')].map(r => [r.dataset.variable, r.dataset.choiceWithout,
    r.querySelector('.num').getAttribute('data-value')]),
  stages: [...t.querySelectorAll('.stage-ms')].map(s => [s.dataset.stage, s.dataset.value]),
  total: t.querySelector('.total-ms').dataset.value,
  source: t.querySelector('.guard-verdict .source').dataset.value,
  guard: t.querySelector('.guard-verdict .guard-reason').dataset.value,
  replaced: t.querySelector('.guard-verdict .replaced').dataset.value,
  responderMs: t.querySelector('.responder-ms').dataset.value,
  firstTokenMs: t.querySelector('.first-token-ms').dataset.value,
};
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        message = f"{CHROMIUM} / {CHROMEDRIVER} absent: apt-get install chromium chromium-driver"
        if in_ci():
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    require_module("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for (or download) a browser or driver
    profile = tempfile.mkdtemp(prefix="coact-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    # The viewport itself 1400x1000 (the window size would include the browser's frame).
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(what: str, check, timeout_s: float = TURN_TIMEOUT_S, every_s: float = 0.1):
    return wait_for(check, timeout_s, what, every_s)


def _parse_sse(raw: str) -> list[tuple[str, float | None, dict]]:
    events = []
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        name, sent, data = "message", None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("id:"):
                sent = float(line[3:].strip())
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if data:
            events.append((name, sent, json.loads("\n".join(data))))
    return events


def _values(pairs: list) -> dict:
    return {k: float(v) for k, v in pairs}


def _check_panel(panel: dict, done: dict) -> None:
    """Every number the panel shows equals the wire's value exactly (the `data-value` attributes)."""
    stages = done["trace"]["stages"]
    by = {s["stage"]: s["output"] for s in stages}
    decision = [s for s in stages if s["stage"] == "decision"][-1]["output"]
    assert panel["action"] == done["action"]["name"]
    assert [(k, float(v)) for k, v in panel["intent"]] == [(t["label"], t["p"]) for t in by["intent"]["top"]]
    assert _values(panel["findings"]) == by["reasoner"]["findings"]
    assert {(v, s): float(p) for v, s, p in panel["posterior"]} == {
        (v, s): p for v, dist in decision["posterior"].items() for s, p in dist.items()}
    assert _values(panel["eu"]) == decision["expected_utility"] and len(panel["eu"]) == len(decision["expected_utility"])
    assert panel["chosen"] == [decision["action"]]
    assert _values(panel["voi"]) == decision["value_of_information"]
    assert [(v, c, float(x)) for v, c, x in panel["influence"]] == [
        (x["variable"], x["choice_without"], x["shift"]) for x in decision["explanation"]]
    assert [(s, float(ms)) for s, ms in panel["stages"]] == [(s["stage"], s["ms"]) for s in stages]
    assert float(panel["total"]) == done["trace"]["total_ms"]
    assert panel["source"] == done["source"] and panel["guard"] == (done["guard"] or "")
    assert panel["replaced"] == str(done["replaced"]).lower()
    assert float(panel["responderMs"]) == done["responder_ms"]
    assert (float(panel["firstTokenMs"]) if panel["firstTokenMs"] else None) == done["first_token_ms"]


def _turn_count(driver) -> int:
    return driver.execute_script("return document.querySelectorAll('#chat .turn').length")


def test_decision_page(app_url: str, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    # The routes: the page and its files, a fixed allow-list, none of them in the OpenAPI schema.
    page = httpx.get(f"{app_url}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        r = httpx.get(f"{app_url}/web/{name}", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), (name, r.status_code)
    r = httpx.get(f"{app_url}/web/secrets.txt", timeout=30)
    assert r.status_code == 404 and "secrets.txt" in r.json()["error"]
    paths = httpx.get(f"{app_url}/openapi.json", timeout=30).json()["paths"]
    assert "/" not in paths and "/web/{name}" not in paths and "/v1/chat" in paths

    driver = browser
    driver.get(f"{app_url}/")
    _wait("the page script", lambda: driver.execute_script("return !!window.coact"), 30)
    driver.execute_script(INSTRUMENT)
    box = driver.find_element(By.ID, "message")

    dones = []
    for i, message in enumerate(CONVERSATION):
        box.send_keys(message)
        driver.find_element(By.ID, "send").click()
        _wait(f"turn {i} to finish", lambda i=i: driver.execute_script(
            f"const t = document.querySelector('.turn[data-turn=\"{i}\"]'); return t && t.dataset.state"
        ) in ("done", "error"))
        _wait(f"turn {i}'s body to be read", lambda i=i: driver.execute_script(f"return window.__rawDone[{i}]"), 30)
        events = _parse_sse(driver.execute_script(f"return window.__raw[{i}]"))
        names = [e[0] for e in events]
        assert names[0] == "decision" and names[-1] == "done" and "token" in names, names
        done_sent, done = events[-1][1], events[-1][2]
        panel = driver.execute_script(READ_PANEL, i)
        assert panel["state"] == "done", panel["state"]
        assert panel["user"] == message and panel["reply"] == done["reply"]

        # Streaming: the page showed text while this turn was not done, and its first token was on screen
        # before the server even sent `done` (a page that waited for the whole reply cannot pass either).
        snaps = driver.execute_script("return window.__snaps")
        assert any(s["turn"] == i and s["state"] == "streaming" and s["chars"] > 0 for s in snaps), \
            f"turn {i}: no moment with streamed text before the turn was done"
        if i == 0:  # the decided content streams first, whether or not the LM's sentence follows it
            assert done["first_token_ms"] is not None, (done["source"], done["guard"])
        if done["first_token_ms"] is not None:
            assert float(panel["firstTokenAt"]) < done_sent == float(panel["doneSentAt"]), \
                (panel["firstTokenAt"], done_sent)
        _check_panel(panel, done)
        dones.append(done)

    session_id = dones[0]["session_id"]
    assert {d["session_id"] for d in dones} == {session_id}
    assert driver.execute_script("return document.querySelector('#chat').dataset.session") == session_id
    # The page's conversation is the session the API keeps.
    history = httpx.get(f"{app_url}/v1/sessions/{session_id}", timeout=30).json()["session"]["history"]
    assert [h["text"] for h in history] == [x for m, d in zip(CONVERSATION, dones, strict=True) for x in (m, d["reply"])]

    # The explain link: the token attributions of POST /v1/explain, shown token by token with their values.
    driver.find_element(By.CSS_SELECTOR, '.turn[data-turn="0"] .explain').click()
    box0 = '.turn[data-turn="0"] .attributions'
    _wait("the attributions", lambda: driver.execute_script(
        f"return document.querySelectorAll('{box0} .token').length > 0 || "
        f"document.querySelector('{box0} .unavailable') !== null"), 120)
    explained = httpx.post(f"{app_url}/v1/explain", json={"message": CONVERSATION[0]}, timeout=120)
    assert explained.status_code == 200, explained.text
    body = explained.json()
    shown = driver.execute_script(f"return [...document.querySelectorAll('{box0} .token')]"
                                  ".map(s => [s.textContent, s.dataset.value])")
    assert [(t, float(a)) for t, a in shown] == list(zip(body["tokens"], body["attributions"], strict=True))
    assert body["target"] in driver.find_element(By.CSS_SELECTOR, box0).text

    shot = tmp_path / "web-page.png"
    # The last turn's top just below the middle: the first turn's bubbles stay in view (they are sticky).
    driver.execute_script("const c = document.querySelector('#chat'), t = c.querySelector('.turn:last-child');"
                          "c.scrollTop = t.offsetTop - c.offsetTop - c.clientHeight * 0.55")
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("COACT_WEB_SCREENSHOT"):  # to refresh docs/web-page.png
        shutil.copy(shot, os.environ["COACT_WEB_SCREENSHOT"])

    # Start over: an empty chat and no session; the old one stays in the list and reloads from the API.
    driver.find_element(By.ID, "start-over").click()
    assert _turn_count(driver) == 0
    assert driver.execute_script("return document.querySelector('#chat').dataset.session") == ""
    link = driver.find_element(By.CSS_SELECTOR, f'#sessions a[data-session="{session_id}"]')
    link.click()
    _wait("the session to reload", lambda: _turn_count(driver) == len(CONVERSATION), 30)
    for i, done in enumerate(dones):
        panel = driver.execute_script(READ_PANEL, i)
        assert panel["user"] == CONVERSATION[i] and panel["reply"] == done["reply"]
        assert _values(panel["eu"]) == [s for s in done["trace"]["stages"] if s["stage"] == "decision"][-1][
            "output"]["expected_utility"]
    driver.find_element(By.ID, "start-over").click()
    assert _turn_count(driver) == 0
