"""How the confirmation before a freeze depends on the pack's P(the customer agrees | card safe).

    python -m coact.cluster.jobs.confirmation_sensitivity [--values 0.3 0.4 0.5]

Runs short conversations through the served turn logic in this process (the real intent model, act classifier
and finding heads from the models folder; the policy of the banking pack with `confirm.affirm.no` replaced by
each value) and prints what the policy does at each turn. No Ray, no HTTP: `plan_turn` / `Policy.decide` /
`close_or_continue` are the functions the graph runs.
"""

from __future__ import annotations

import argparse
import re

from coact.cluster.runtime import quiet_env

FLOWS = (
    ("I see a payment I don't recognise", "yes"),
    ("There's a cash withdrawal on my statement that I don't remember", "yes"),
    ("There's a transaction on my statement I don't recognise", "yes"),
    ("my son used my card without asking me", "I'm not sure", "yes"),
    ("my flatmate might have borrowed my card", "I'm not sure"),
    ("I gave my card details to a website that looked a bit odd", "I'm not sure", "I'm not sure"),
    ("I lost my wallet with my cards in it",),
    ("I think I've lost my card",),
)


def main(argv: list[str] | None = None) -> int:
    quiet_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--values", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    args = ap.parse_args(argv)

    from coact.actors.engines import IntentEngine, ReasonerEngine
    from coact.cluster.prepare import ensure_models
    from coact.graphs.policy.dialogue import close_or_continue, plan_turn, split_requests
    from coact.graphs.policy.domain import parse_pack, resolve_pack_path
    from coact.graphs.policy.messages import IntentRequest, SessionState
    from coact.graphs.policy.policy import Policy

    models = ensure_models()
    intent_engine, reasoner_engine = IntentEngine(models=models), ReasonerEngine(models=models)
    text = resolve_pack_path("banking").read_text(encoding="utf-8")
    for value in args.values:
        pack = parse_pack(re.sub(r'(affirm: \{"yes": [0-9.]+, "no": )[0-9.]+\}', rf"\g<1>{value}}}", text, count=1))
        policy = Policy(pack)
        print(f"P(agree | card safe) = {value}")
        for flow in FLOWS:
            session, did = SessionState(session_id="s"), []
            for message in flow:
                intent = intent_engine.classify([IntentRequest(message=message, pending=session.pending_question)])[0]
                parts = intent_engine.classify([IntentRequest(message=p) for p in split_requests(message)]) \
                    if split_requests(message) else []
                plan = plan_turn(session, message, intent, reasoner_engine.reason([message])[0], pack, parts)
                decision = None if plan.reply is not None else policy.decide(plan.evidence, explain=False)
                close_or_continue(session, plan, decision, pack)
                session.turns += 1
                did.append(decision.action if decision else plan.reply_name)
            print("  " + " | ".join(f"{m!r} -> {d}" for m, d in zip(flow, did, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
