"""What the customer gets from each reply, on the dialogue set: the reason clause, what the LM added, what was
taken back, and when text arrived.

Streams every user turn of `cluster/dialogues/banking.yaml` (fresh session per dialogue) to one or more served
apps, side by side in one run (e.g. the two Responder layouts), and prints per app:
  - reason: share of act/ask/escalate/decline replies that carry their reason clause (the trace's `reason_clause`);
  - model: share of replies with an LM sentence the guard passed; generic: share of all replies whose LM sentence
    is one of the generic phrases below or names no word the customer used;
  - replaced: share of streamed replies withdrawn mid-stream (a `replace` event);
  - decision / first text / done: p50 ms from the request, read on this side of the socket.

    python -m coact.cluster.experiments.bench_replies --url content_first=http://127.0.0.1:8000 \
        --url opener_first=http://127.0.0.1:8001 --out results/bench_replies.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import httpx

from coact.actors.guard import first_sentence
from coact.cluster.jobs.test_dialogues import load_dialogues

GENERIC = ["here to assist", "happy to help", "glad to help", "how can i help", "thank you for reaching out",
           "thanks for reaching out", "i understand your concern", "any way possible", "i'm here to help",
           "sorry to hear that", "i'm sorry for any inconvenience", "let me help you", "i can help"]
_WORD = re.compile(r"[a-z']+")
_STOP = set("""a an the i i'm you your me my we it to of for and or but so is are was be about that this
with on in at by thanks thank telling tell told here help assist sorry hear any way possible today now""".split())


def is_generic(sentence: str, said: list[str]) -> bool:
    low = sentence.lower()
    if any(g in low for g in GENERIC):
        return True
    theirs = {w for m in said for w in _WORD.findall(m.lower())} - _STOP
    return not any(w in theirs for w in _WORD.findall(low))


def _stream_turn(client: httpx.Client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    got: dict = {"decision_ms": None, "first_ms": None, "replaced": False}
    event = None
    with client.stream("POST", f"{url}/v1/chat", json=body | {"stream": True}, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                ms = (time.perf_counter() - t0) * 1000.0
                data = json.loads(line[6:])
                if event == "decision":
                    got["decision_ms"] = ms
                elif event == "token" and data.get("text") and got["first_ms"] is None:
                    got["first_ms"] = ms
                elif event == "replace":
                    got["replaced"] = True
                elif event == "done":
                    got["done_ms"], got["done"] = ms, data
    return got


def run(url: str, dialogues) -> dict:
    rows = []
    with httpx.Client() as client:
        for d in dialogues:
            sid, said = None, []
            for turn in d.turns:
                said.append(turn.user)
                got = _stream_turn(client, url, {"message": turn.user} | ({"session_id": sid} if sid else {}))
                done = got["done"]
                sid = done["session_id"]
                stages = done["trace"]["stages"]
                out = [s for s in stages if s["stage"] == "responder"][-1]["output"]
                decision = [s for s in stages if s["stage"] == "decision"][-1]["output"]
                clause = (decision.get("reason_clause") or {}).get("clause")
                kind = done["action"]["kind"]
                sentence = first_sentence(out.get("generated") or "")  # the LM's sentence, with its prefix
                rows.append({"kind": kind, "needs_reason": kind in {"action", "ask", "escalate", "decline"}
                             and "skipped" not in decision, "has_reason": bool(clause and clause in done["reply"]),
                             "model": out.get("source") == "model", "lm_ran": bool(out.get("tokens")),
                             "generic": out.get("source") == "model" and is_generic(sentence, said),
                             "replaced": got["replaced"], "decision_ms": got["decision_ms"],
                             "first_ms": got["first_ms"], "done_ms": got["done_ms"], "reply": done["reply"]})
    need = [r for r in rows if r["needs_reason"]]
    lm = [r for r in rows if r["lm_ran"]]

    def p50(key: str) -> float:
        vals = [r[key] for r in rows if r[key] is not None]
        return round(statistics.median(vals), 1) if vals else float("nan")

    return {"replies": len(rows), "reason_share": sum(r["has_reason"] for r in need) / max(1, len(need)),
            "needs_reason": len(need), "model_share": sum(r["model"] for r in rows) / max(1, len(rows)),
            "guard_pass": sum(r["model"] for r in lm) / max(1, len(lm)),
            "generic_share": sum(r["generic"] for r in rows) / max(1, len(rows)),
            "replaced_share": sum(r["replaced"] for r in rows) / max(1, len(rows)),
            "decision_p50_ms": p50("decision_ms"), "first_text_p50_ms": p50("first_ms"), "done_p50_ms": p50("done_ms"),
            "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", action="append", required=True, help="NAME=URL, repeatable")
    ap.add_argument("--limit", type=int, default=0, help="first N dialogues only (0: all)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    dialogues = load_dialogues()
    dialogues = dialogues[: args.limit] if args.limit else dialogues
    report = {}
    for spec in args.url:  # interleaving by app would be fairer on load; apps run one after the other here
        name, _, url = spec.partition("=")
        report[name] = run(url or name, dialogues)
    print(f"{'app':16} {'replies':>7} {'reason':>7} {'model':>6} {'guard':>6} {'generic':>7} {'replaced':>8} "
          f"{'decision':>8} {'first':>7} {'done':>7}")
    for name, r in report.items():
        print(f"{name:16} {r['replies']:7d} {r['reason_share']:7.1%} {r['model_share']:6.1%} {r['guard_pass']:6.1%} "
              f"{r['generic_share']:7.1%} {r['replaced_share']:8.1%} {r['decision_p50_ms']:8.1f} "
              f"{r['first_text_p50_ms']:7.1f} {r['done_p50_ms']:7.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
