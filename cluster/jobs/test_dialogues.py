"""Run the multi-turn test dialogues (Rasa-style test stories) against a running app over HTTP.

    python -m coact.cluster.jobs.test_dialogues --url http://127.0.0.1:8000 [--file F] [--out DIR]
        [--concurrency N] [--category C] [--name N] [--min-pass 0.95] [--min-category 0.85]

Each dialogue is sent turn by turn to ``POST {url}/v1/chat`` (the first turn opens a session, the
later ones send its ``session_id``); every turn's response is checked against what the YAML allows,
and a dialogue stops at its first failing turn. ``report.md`` and ``report.json`` go into ``--out``.
The exit code is 0 unless ``--min-pass`` / ``--min-category`` thresholds are given and not met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from coact.graphs.policy.actions import claimed_actions

DOMAIN = "banking"  # the pack whose action replies count as claims

REPO = Path(__file__).resolve().parents[2]
DEFAULT_FILE = REPO / "cluster" / "dialogues" / "banking.yaml"
DOMAINS_DIR = REPO / "graphs" / "policy" / "domains"
DEFAULT_OUT = Path("dialogue-report")
REQUEST_TIMEOUT_S = 180.0
BODY_EXCERPT = 500

Kind = Literal["answer", "ask", "action", "escalate", "decline", "chitchat"]
Category = Literal[
    "one_shot", "request_human", "frustration", "closing", "greeting", "confirmation_after_action",
    "follow_up", "correction", "answer_in_words", "unsure", "pending_survives_chitchat", "disambiguation",
    "topic_change", "two_requests", "out_of_scope", "injection", "answer_then_thanks",
]


# --- the dialogue set -----------------------------------------------------------------------------


class Turn(BaseModel):
    """One user message and what the server may do with it."""

    model_config = ConfigDict(extra="forbid")

    user: str = Field(min_length=1)
    kinds: list[Kind] = Field(min_length=1)
    intents: list[str] | None = None  # allowed action.target when the kind is answer
    targets: list[str] | None = None  # allowed action.target when the kind is ask
    actions: list[str] | None = None  # allowed action.name when the kind is action
    contains: list[str] = Field(default_factory=list)
    not_contains: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _lists_match_kinds(self) -> Turn:
        for field, kind in (("intents", "answer"), ("targets", "ask"), ("actions", "action")):
            values = getattr(self, field)
            if values is not None and (not values or kind not in self.kinds):
                raise ValueError(f"{field} needs a non-empty list and '{kind}' among kinds")
        return self

    def expected(self) -> dict[str, Any]:
        return self.model_dump(exclude={"user"}, exclude_none=True, exclude_defaults=True) | {"kinds": self.kinds}


class Dialogue(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    category: Category
    turns: list[Turn] = Field(min_length=1)


class DialogueSetError(ValueError):
    """The YAML does not describe a valid dialogue set; the message names each bad dialogue and field."""


def _field_path(loc: Sequence[int | str]) -> str:
    return ".".join(str(part) for part in loc) or "(dialogue)"


def _parse_dialogue(index: int, raw: Any) -> tuple[Dialogue | None, list[str]]:
    label = raw.get("name", f"#{index}") if isinstance(raw, dict) else f"#{index}"
    try:
        return Dialogue.model_validate(raw), []
    except ValidationError as e:
        return None, [f"dialogue {label!r}: {_field_path(err['loc'])}: {err['msg']}" for err in e.errors()]


def known_intents(domain: str) -> set[str] | None:
    """The intent names of a domain pack in graphs/domains/, or None when the pack is not there."""
    path = DOMAINS_DIR / f"{domain}.yaml"
    if not path.exists():
        return None
    pack = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {str(i["name"]) for i in pack.get("intents", [])}


def _duplicate_names(raw: list[Any]) -> list[str]:
    names = [d.get("name") for d in raw if isinstance(d, dict) and d.get("name")]
    return [f"dialogue {n!r}: name: duplicate name" for n in sorted({n for n in names if names.count(n) > 1})]


def _semantic_errors(dialogues: list[Dialogue], intents: Collection[str] | None) -> list[str]:
    errors = []
    for d in dialogues:
        for i, turn in enumerate(d.turns):
            unknown = [x for x in turn.intents or [] if intents is not None and x not in intents]
            if unknown:
                errors.append(f"dialogue {d.name!r}: turns.{i}.intents: unknown intents {unknown}")
            bad = [t for t in turn.targets or [] if t != "goal" and not t.startswith(("q_", "confirm:"))]
            if bad:
                errors.append(f"dialogue {d.name!r}: turns.{i}.targets: not a question variable {bad}")
    return errors


def load_dialogues(path: str | Path = DEFAULT_FILE, intents: Collection[str] | None = None) -> list[Dialogue]:
    """Load and validate a dialogue set. Intent labels are checked against `intents`, or else against the
    domain pack the file names (`domain:`) when that pack exists."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("dialogues"), list):
        raise DialogueSetError(f"{path}: expected a mapping with a 'dialogues' list")
    dialogues, errors = [], []
    for index, raw in enumerate(data["dialogues"]):
        dialogue, problems = _parse_dialogue(index, raw)
        errors.extend(problems)
        if dialogue is not None:
            dialogues.append(dialogue)
    if intents is None and data.get("domain"):
        intents = known_intents(str(data["domain"]))
    errors.extend(_duplicate_names(data["dialogues"]))
    errors.extend(_semantic_errors(dialogues, intents))
    if errors:
        raise DialogueSetError(f"{path}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    return dialogues


def select(dialogues: list[Dialogue], categories: Collection[str] = (), names: Collection[str] = ()) -> list[Dialogue]:
    return [d for d in dialogues if (not categories or d.category in categories) and (not names or d.name in names)]


# --- checking one turn ----------------------------------------------------------------------------


def _excerpt(body: Any) -> str:
    text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    return text[:BODY_EXCERPT]


def check_turn(turn: Turn, status: int, body: Any) -> list[str]:
    """Every way the response breaks what the turn allows; an empty list means the turn passed."""
    if status != 200:
        return [f"HTTP {status}: {_excerpt(body)}"]
    action = body.get("action") if isinstance(body, dict) else None
    if not isinstance(action, dict) or not isinstance(body.get("reply"), str):
        return [f"malformed response (no action/reply): {_excerpt(body)}"]
    kind, name, target = action.get("kind"), action.get("name"), action.get("target")
    if kind not in turn.kinds:
        return [f"kind {kind!r} not in {turn.kinds}"]
    problems = []
    for allowed, when, value, what in ((turn.intents, "answer", target, "intent"),
                                       (turn.targets, "ask", target, "question"),
                                       (turn.actions, "action", name, "action")):
        if allowed is not None and kind == when and value not in allowed:
            problems.append(f"{what} {value!r} not in {allowed}")
    reply = body["reply"].lower()
    problems += [f"reply contains {s!r}" for s in turn.not_contains if s.lower() in reply]
    problems += [f"reply lacks {s!r}" for s in turn.contains if s.lower() not in reply]
    return problems


# --- results and report ---------------------------------------------------------------------------


class TurnRecord(BaseModel):
    index: int
    user: str
    status: int
    kind: str | None = None
    name: str | None = None
    target: str | None = None
    reply: str | None = None
    intent_top: str | None = None  # the intent classifier's top label, from the trace when present
    body: str | None = None  # an excerpt of the body when the status was not 200
    ms: float = 0.0
    problems: list[str] = Field(default_factory=list)
    executed: list[str] = Field(default_factory=list, description="actions the executor confirmed (done) this turn")
    claimed: list[str] = Field(default_factory=list, description="actions the reply says were just done")


class Failure(BaseModel):
    dialogue: str
    category: str
    turn: int
    message: str
    expected: dict[str, Any]
    got: TurnRecord


class DialogueResult(BaseModel):
    name: str
    category: str
    passed: bool
    turns: list[TurnRecord]
    failure: Failure | None = None


class CategoryStats(BaseModel):
    category: str
    passed: int
    total: int

    @property
    def rate(self) -> float:
        return self.passed / self.total if self.total else 0.0


class Report(BaseModel):
    url: str
    started_at: float
    duration_s: float
    results: list[DialogueResult]

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def rate(self) -> float:
        return self.passed / self.total if self.total else 0.0

    def action_mismatches(self) -> list[str]:
        """Turns whose reply claims other actions than the executor did (must be none)."""
        return [f"{r.name} turn {t.index}: executed {t.executed}, claimed {t.claimed}"
                for r in self.results for t in r.turns if sorted(t.executed) != sorted(t.claimed)]

    def categories(self) -> list[CategoryStats]:
        stats: dict[str, CategoryStats] = {}
        for r in self.results:
            s = stats.setdefault(r.category, CategoryStats(category=r.category, passed=0, total=0))
            s.total += 1
            s.passed += int(r.passed)
        return list(stats.values())

    def failures(self) -> list[Failure]:
        return [r.failure for r in self.results if r.failure is not None]


# --- running over HTTP ----------------------------------------------------------------------------


async def post_turn(client: httpx.AsyncClient, url: str, message: str, session_id: str | None) -> tuple[int, Any]:
    """One chat turn; a transport error comes back as status 0 with the error text, never raises."""
    body = {"message": message} | ({"session_id": session_id} if session_id else {})
    try:
        r = await client.post(f"{url.rstrip('/')}/v1/chat", json=body)
    except httpx.HTTPError as e:
        return 0, f"{type(e).__name__}: {e}"
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


def _intent_top(body: dict[str, Any]) -> str | None:
    stages = (body.get("trace") or {}).get("stages") or []
    for stage in stages:
        if isinstance(stage, dict) and stage.get("stage") == "intent":
            top = (stage.get("output") or {}).get("top") or []
            if top and isinstance(top[0], dict):
                return top[0].get("label")
    return None


def _pack():
    from coact.graphs.policy.domain import load_pack

    return load_pack(DOMAIN)


def record_turn(index: int, turn: Turn, status: int, body: Any, ms: float) -> TurnRecord:
    rec = TurnRecord(index=index, user=turn.user, status=status, ms=round(ms, 1), problems=check_turn(turn, status, body))
    if status == 200 and isinstance(body, dict) and isinstance(body.get("action"), dict):
        rec.kind, rec.name, rec.target = (body["action"].get(k) for k in ("kind", "name", "target"))
        rec.reply, rec.intent_top = body.get("reply"), _intent_top(body)
        rec.executed = [r["action"] for r in body["action"].get("executed") or [] if r.get("status") == "done"]
        rec.claimed = claimed_actions(_pack(), rec.reply or "")
    else:
        rec.body = _excerpt(body)
    return rec


async def run_dialogue(client: httpx.AsyncClient, url: str, dialogue: Dialogue) -> DialogueResult:
    session_id: str | None = None
    records: list[TurnRecord] = []
    for index, turn in enumerate(dialogue.turns):
        t0 = time.perf_counter()
        status, body = await post_turn(client, url, turn.user, session_id)
        rec = record_turn(index, turn, status, body, (time.perf_counter() - t0) * 1000)
        records.append(rec)
        if rec.problems:
            failure = Failure(dialogue=dialogue.name, category=dialogue.category, turn=index, message=turn.user,
                              expected=turn.expected(), got=rec)
            return DialogueResult(name=dialogue.name, category=dialogue.category, passed=False, turns=records,
                                  failure=failure)
        session_id = session_id or body.get("session_id")
    return DialogueResult(name=dialogue.name, category=dialogue.category, passed=True, turns=records)


async def run_dialogues(url: str, dialogues: Sequence[Dialogue], concurrency: int = 4) -> Report:
    """Run every dialogue (its turns in order, up to `concurrency` dialogues at once)."""
    started, t0 = time.time(), time.perf_counter()
    gate = asyncio.Semaphore(max(1, concurrency))
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0)
    limits = httpx.Limits(max_connections=max(1, concurrency) * 2)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def one(d: Dialogue) -> DialogueResult:
            async with gate:
                return await run_dialogue(client, url, d)

        results = await asyncio.gather(*(one(d) for d in dialogues))
    return Report(url=url, started_at=started, duration_s=round(time.perf_counter() - t0, 1), results=list(results))


# --- writing the report ---------------------------------------------------------------------------


def _pct(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def markdown_table(report: Report) -> str:
    lines = ["| category | passed | total | % |", "|---|---:|---:|---:|"]
    lines += [f"| {s.category} | {s.passed} | {s.total} | {_pct(s.rate)} |" for s in report.categories()]
    lines.append(f"| **all** | **{report.passed}** | **{report.total}** | **{_pct(report.rate)}** |")
    return "\n".join(lines)


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _failure_md(f: Failure) -> str:
    got = f.got
    came_back = (f"kind={got.kind} name={got.name} target={got.target} (intent top: {got.intent_top})"
                 if got.status == 200 else f"HTTP {got.status}")
    lines = [
        f"### {f.dialogue} ({f.category}), turn {f.turn}",
        f"- message: {_md_cell(f.message)}",
        f"- expected: `{json.dumps(f.expected, ensure_ascii=False)}`",
        f"- got: {came_back}",
        f"- reply: {_md_cell(got.reply)}" if got.status == 200 else f"- body: {_md_cell(got.body)}",
        f"- why: {'; '.join(got.problems)}",
    ]
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    parts = [
        "# Dialogue test report",
        "",
        f"{report.url} — **{report.passed}/{report.total} dialogues passed ({_pct(report.rate)})** "
        f"in {report.duration_s:.0f} s.",
        "",
        markdown_table(report),
        "",
        f"Actions: {sum(len(t.executed) for r in report.results for t in r.turns)} executed (done), "
        f"{sum(len(t.claimed) for r in report.results for t in r.turns)} claimed in replies, "
        f"{len(report.action_mismatches())} turns where they differ"
        + "".join(f"\n- {m}" for m in report.action_mismatches()),
        "",
        f"## Failures ({len(report.failures())})",
        "",
    ]
    parts += [_failure_md(f) + "\n" for f in report.failures()]
    return "\n".join(parts)


def report_json(report: Report) -> dict[str, Any]:
    return {
        "url": report.url,
        "started_at": report.started_at,
        "duration_s": report.duration_s,
        "totals": {"passed": report.passed, "total": report.total, "rate": round(report.rate, 4)},
        "categories": [{"category": s.category, "passed": s.passed, "total": s.total, "rate": round(s.rate, 4)}
                       for s in report.categories()],
        "failures": [f.model_dump() for f in report.failures()],
        "dialogues": [r.model_dump(exclude={"failure"}) for r in report.results],
    }


def write_report(report: Report, out_dir: str | Path = DEFAULT_OUT) -> Path:
    """Write report.md and report.json into `out_dir`; returns the markdown file's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report_json(report), indent=2, ensure_ascii=False), encoding="utf-8")
    md = out / "report.md"
    md.write_text(render_markdown(report), encoding="utf-8")
    return md


def threshold_failures(report: Report, min_pass: float | None, min_category: float | None) -> list[str]:
    problems = []
    if min_pass is not None and report.rate < min_pass:
        problems.append(f"overall pass rate {_pct(report.rate)} < {_pct(min_pass)}")
    if min_category is not None:
        problems += [f"category {s.category} {_pct(s.rate)} < {_pct(min_category)}"
                     for s in report.categories() if s.rate < min_category]
    return problems


# --- command line ---------------------------------------------------------------------------------


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the running app")
    p.add_argument("--file", type=Path, default=DEFAULT_FILE, help="dialogue set (YAML)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for report.md and report.json")
    p.add_argument("--concurrency", type=int, default=4, help="dialogues run at once")
    p.add_argument("--category", action="append", default=[], help="only this category (repeatable)")
    p.add_argument("--name", action="append", default=[], help="only this dialogue (repeatable)")
    p.add_argument("--min-pass", type=float, help="exit 1 when fewer than this fraction of dialogues pass")
    p.add_argument("--min-category", type=float, help="exit 1 when any category passes below this fraction")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        dialogues = select(load_dialogues(args.file), args.category, args.name)
    except DialogueSetError as e:
        print(e, file=sys.stderr)
        return 2
    if not dialogues:
        print("no dialogue matches --category/--name", file=sys.stderr)
        return 2
    print(f"running {len(dialogues)} dialogues against {args.url} (concurrency {args.concurrency})", flush=True)
    report = asyncio.run(run_dialogues(args.url, dialogues, args.concurrency))
    md = write_report(report, args.out)
    print(markdown_table(report))
    print(f"\n{report.passed}/{report.total} dialogues passed ({_pct(report.rate)}); report: {md}")
    problems = threshold_failures(report, args.min_pass, args.min_category)
    for problem in problems:
        print(f"threshold not met: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
