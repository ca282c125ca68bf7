"""Turn logic between the stages: reading acts and answers, the case across turns, evidence, templates.

Plain functions over the wire schemas, no Ray: the ingress, the DecisionActor, the simulator and
`tune_policy` all call these, so the policy that is tuned is the policy that is served.

A *case* is the evidence about one goal (`SessionState.evidence`). It stays open while questions
are asked, closes on a terminal action (its goal posterior is kept as `goal_belief`), and the next
message opens a new case whose prior over the goal comes from a transition model: the same goal,
another goal of its group, or the base prior. A correction reopens the closed case without the
corrected turn's evidence; a clear change of topic during an open case opens a new one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from coact.graphs.policy.bayesnet import BayesNet
from coact.graphs.policy.decide import VirtualQuestion
from coact.graphs.policy.domain import DomainPack, Question, build_network
from coact.graphs.policy.messages import (
    DecisionResult,
    IntentResult,
    ReasonerResult,
    SessionEvidence,
    SessionState,
    SoftEvidenceItem,
)

TERMINAL_KINDS = {"answer", "action", "escalate", "decline"}
POSTERIOR_TOP_K = 5
EXPLANATION_TOP_K = 5
ACT_THRESHOLD = 0.5  # the act heads are calibrated sigmoids: 0.5 is the Bayes decision
CONTENT_THRESHOLD = 0.5
SOCIAL_ACTS = ("goodbye", "thanks", "greeting")  # replied to by template; goodbye wins when combined
SOMETHING_ELSE = "something_else"
GOAL_QUESTION = "goal"  # the disambiguation question's name ("ask:goal")
CONFIRM_PREFIX = "confirm:"  # a confirmation question's name: "confirm:<action>" ("ask:confirm:freeze_card")


# --- acts -------------------------------------------------------------------------------------


def acts_of(intent: IntentResult) -> set[str]:
    return {a for a, p in intent.acts.items() if p >= ACT_THRESHOLD}


CONFIDENT_INTENT = 0.8  # an in-scope intent this sure is domain content, whatever the content head says


def has_content(intent: IntentResult, oos_label: str = "out_of_scope") -> bool:
    top = intent.top[0]
    return intent.content >= CONTENT_THRESHOLD or (top.p >= CONFIDENT_INTENT and top.label != oos_label)


# --- evidence ---------------------------------------------------------------------------------


def _likelihood_ratio(p: np.ndarray, prior: np.ndarray) -> np.ndarray:
    # A calibrated classifier gives P(state | text); the network needs P(text | state) up to a
    # constant, i.e. the posterior divided by the prior the classifier was trained under.
    lam = np.clip(p, 1e-9, None) / np.clip(prior, 1e-9, None)
    return lam / lam.max()


def goal_states(pack: DomainPack) -> list[str]:
    return pack.states_of(next(v for v in pack.variables if v.name == pack.intent_variable))


def goal_prior(pack: DomainPack) -> np.ndarray:
    """The network's prior over the goal (a root node)."""
    net = _network(pack)
    return net.cpts[pack.intent_variable]


_NETWORKS: dict[int, tuple[DomainPack, BayesNet]] = {}


def _network(pack: DomainPack) -> BayesNet:
    hit = _NETWORKS.get(id(pack))
    if hit is None or hit[0] is not pack:
        hit = (pack, build_network(pack))
        _NETWORKS[id(pack)] = hit
    return hit[1]


def intent_likelihood(intent: IntentResult, pack: DomainPack) -> np.ndarray:
    """P(text | goal) up to a constant, over the goal's states."""
    states = goal_states(pack)
    probs = dict(zip(intent.labels, intent.probs, strict=True))
    prior = dict(zip(intent.labels, intent.class_prior, strict=True))
    missing = [s for s in states if s not in probs]
    if missing:
        raise ValueError(f"intent model does not cover goal states {missing[:5]}")
    return _likelihood_ratio(np.array([probs[s] for s in states]), np.array([prior[s] for s in states]))


def intent_evidence(intent: IntentResult, pack: DomainPack, turn: int) -> SoftEvidenceItem:
    lam = intent_likelihood(intent, pack)
    return SoftEvidenceItem(
        variable=pack.intent_variable,
        likelihood={s: float(x) for s, x in zip(goal_states(pack), lam, strict=True)},
        label=f"turn {turn}: intent classifier (top: {intent.top[0].label} {intent.top[0].p:.2f})",
        turn=turn,
    )


def goal_dependent(pack: DomainPack) -> set[str]:
    """Findings that descend from the goal: the intent model reads the same words about the same goal."""
    parents = {v.name: v.parents for v in pack.variables}

    def descends(name: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(p == pack.intent_variable or (p not in seen and descends(p, seen | {p}))
                   for p in parents.get(name, []))

    return {f.name for f in pack.findings if descends(f.name)}


def finding_evidence(reasoner: ReasonerResult, pack: DomainPack, turn: int) -> list[SoftEvidenceItem]:
    """One soft item per finding: the head's odds against the prior it was trained under.

    A finding below the goal would count the message twice (the intent head reads the same words),
    so its likelihood is tempered by `dialogue.finding_weight` (0: ignored, 1: independent evidence);
    findings beside the goal (mood) enter at full weight.
    """
    items = []
    known = {f.name for f in pack.findings}
    tempered = goal_dependent(pack)
    weight = pack.dialogue.finding_weight
    for name, p in reasoner.findings.items():
        if name not in known:
            continue
        prior = reasoner.finding_prior.get(name, 0.5)
        lam = _likelihood_ratio(np.array([p, 1 - p]), np.array([prior, 1 - prior]))
        w = weight if name in tempered else 1.0
        if w == 0.0:
            continue
        lam = lam**w
        items.append(SoftEvidenceItem(
            variable=name, likelihood={"yes": float(lam[0]), "no": float(lam[1])},
            label=f"turn {turn}: finding {name} (p={p:.2f})", turn=turn))
    return items


def _belief_vector(pack: DomainPack, belief: dict[str, float]) -> np.ndarray:
    """A stored top-k goal belief as a full distribution: the rest of the mass spread by the prior."""
    states = goal_states(pack)
    base = goal_prior(pack)
    b = np.array([belief.get(s, 0.0) for s in states])
    rest = max(0.0, 1.0 - float(b.sum()))
    free = np.array([s not in belief for s in states], dtype=float) * base
    if free.sum() > 0:
        b = b + rest * free / free.sum()
    return b / b.sum()


def transition_prior(pack: DomainPack, belief: dict[str, float]) -> np.ndarray:
    """P(next goal | closed case): the same goal, another goal of its group, or the base prior."""
    base = goal_prior(pack)
    b = _belief_vector(pack, belief)
    in_group = b @ _neighbourhood(pack)
    ctx = pack.dialogue.context
    return ctx.stay_same * b + ctx.stay_group * in_group + (1 - ctx.stay_same - ctx.stay_group) * base


def _neighbourhood(pack: DomainPack) -> np.ndarray:
    """Row g: the uniform distribution over the goals sharing g's group or one of its related groups."""
    states = goal_states(pack)
    by_name = {i.name: i for i in pack.intents}
    groups = [{by_name[s].group, *by_name[s].related_groups} if s in by_name else {s} for s in states]
    home = [by_name[s].group if s in by_name else s for s in states]
    # Symmetric: a fee question follows a top-up question as readily as the other way round.
    m = np.array([[float(home[j] in groups[i] or home[i] in groups[j]) for j in range(len(states))]
                  for i in range(len(states))])
    return m / m.sum(axis=1, keepdims=True)


def context_evidence(pack: DomainPack, belief: dict[str, float], turn: int) -> SoftEvidenceItem:
    """The transition prior entered as soft evidence: T(goal) / prior(goal), so the network is unchanged."""
    lam = transition_prior(pack, belief) / goal_prior(pack)
    top = max(belief, key=belief.get)  # type: ignore[arg-type]
    return SoftEvidenceItem(
        variable=pack.intent_variable,
        likelihood={s: float(x) for s, x in zip(goal_states(pack), lam / lam.max(), strict=True)},
        label=f"turn {turn}: context of the previous case ({top} {belief[top]:.2f})", turn=turn)


def same_case_probability(pack: DomainPack, belief: dict[str, float], lam: np.ndarray) -> float:
    """P(this message is about the open case's goal | its intent likelihood), by Bayes factor.

    Same case: the goal is drawn from the case's belief; new case: from the base prior.
    """
    if not belief:
        return 0.0
    prior_same = pack.dialogue.context.same_case
    bf = float(_belief_vector(pack, belief) @ lam) / float(goal_prior(pack) @ lam)
    return prior_same * bf / (prior_same * bf + 1 - prior_same)


def option_likelihood(pack: DomainPack, options: list[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """P(answer | goal) for a disambiguation question: an option, or something else, read with noise."""
    states = goal_states(pack)
    answers = (*options, SOMETHING_ELSE)
    noise = pack.dialogue.disambiguation.noise
    off = noise / (len(answers) - 1)
    matrix = np.full((len(answers), len(states)), off)
    for j, s in enumerate(states):
        row = options.index(s) if s in options else len(options)
        matrix[row, j] = 1 - noise
    return answers, matrix


def option_evidence(pack: DomainPack, options: list[str], choice: str, turn: int) -> SoftEvidenceItem:
    answers, matrix = option_likelihood(pack, options)
    lam = matrix[answers.index(choice)]
    return SoftEvidenceItem(
        variable=pack.intent_variable,
        likelihood={s: float(x) for s, x in zip(goal_states(pack), lam / lam.max(), strict=True)},
        label=f"turn {turn}: answer to the disambiguation question ({choice})", turn=turn)


def disambiguation_question(pack: DomainPack, posterior: np.ndarray) -> VirtualQuestion | None:
    """'Is this about A, B or something else?' over the goal's top candidates, or None when not split."""
    cfg = pack.dialogue.disambiguation
    states = goal_states(pack)
    order = [i for i in np.argsort(-posterior) if states[i] != pack.out_of_scope_label]
    options = [states[i] for i in order[: cfg.max_options] if posterior[i] >= cfg.min_share]
    if len(options) < 2:
        return None
    answers, matrix = option_likelihood(pack, options)
    return VirtualQuestion(name=GOAL_QUESTION, variable=pack.intent_variable, answers=answers, likelihood=matrix)


def confirmation_questions(pack: DomainPack, candidates: list[str], evidence: SessionEvidence) -> list[VirtualQuestion]:
    """"Shall I freeze your card now?" for every candidate action the pack marks for confirmation, not yet asked.

    Its answer reads the confirmation's variable through P(agree | state). It is also consent: after a "yes" that
    action is carried out, after a "no" it is off the table, and its VOI is computed under exactly these choices.
    """
    out = []
    for name in candidates:
        spec = pack.actions[name].confirm if name in pack.actions else None
        qname = CONFIRM_PREFIX + name
        if spec is None or qname in evidence.asked:
            continue
        states = pack.states_of(next(v for v in pack.variables if v.name == spec.variable))
        agree = np.array([spec.affirm[s] for s in states])
        out.append(VirtualQuestion(name=qname, variable=spec.variable, answers=("affirm", "deny"),
                                   likelihood=np.stack([agree, 1 - agree]),
                                   excludes=(tuple(n for n in candidates if n != name), (name,))))
    return out


def confirmation_evidence(pack: DomainPack, action: str, agreed: bool, turn: int) -> SoftEvidenceItem:
    spec = pack.actions[action].confirm
    assert spec is not None
    lam = {s: (p if agreed else 1 - p) for s, p in spec.affirm.items()}
    top = max(lam.values())
    return SoftEvidenceItem(variable=spec.variable, likelihood={s: x / top for s, x in lam.items()},
                            label=f"turn {turn}: the customer {'agreed to' if agreed else 'declined'} {action}",
                            turn=turn)


def disambiguation_text(pack: DomainPack, options: list[str]) -> str:
    cfg = pack.dialogue.disambiguation
    titles = [pack.intent(o).title for o in options]
    joined = ", ".join(titles[:-1]) + f", {titles[-1]}" if len(titles) > 2 else " or ".join(titles)
    return cfg.text.format(options=f"{joined}, or {cfg.something_else}" if len(titles) > 2
                           else f"{joined} (or {cfg.something_else})")


# --- reading answers --------------------------------------------------------------------------

# An ordinal answers only as "the second (one)", "option 2", "number two" or a bare "second" / "b":
# "why you need it in the first place" is not a choice.
_ORDINALS = {
    0: r"\b(first|1st) one\b|\bthe former\b|\b(number|option) (one|1)\b|^\W*(the )?(first|1st|a|1)\W*$",
    1: r"\b(second|2nd) one\b|\b(number|option) (two|2)\b|^\W*(the )?(second|2nd|b|2)\W*$",
    2: r"\b(third|3rd) one\b|\b(number|option) (three|3)\b|^\W*(the )?(third|3rd|c|3)\W*$",
}
_LAST = r"\b(last one|the latter)\b|^\W*(the )?last\W*$"
_NONE = r"\b(neither|none|something else|nothing like that|other|not those|none of (them|those|these))\b"
_STOP = {"a", "an", "the", "of", "on", "my", "your", "to", "for", "in", "by", "and", "or", "with", "card", "is"}


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in _STOP}


def read_option(pack: DomainPack, options: list[str], text: str, intent: IntentResult) -> str | None:
    """The disambiguation answer: an ordinal, an option's own words, or the intent model over the options."""
    low = text.lower()
    if re.search(_NONE, low):
        return SOMETHING_ELSE
    for i, rx in _ORDINALS.items():
        if i < len(options) and re.search(rx, low):
            return options[i]
    if re.search(_LAST, low):
        return options[-1]
    words = _words(text)
    titles = {o: _words(pack.intent(o).title) for o in options}
    hits = {o: len(words & (t - set().union(*(titles[x] for x in options if x != o)))) for o, t in titles.items()}
    best = max(hits, key=hits.get)  # type: ignore[arg-type]
    if hits[best] > 0 and sum(v == hits[best] for v in hits.values()) == 1:
        return best
    probs = dict(zip(intent.labels, intent.probs, strict=True))
    mass = np.array([probs.get(o, 0.0) for o in options])
    if mass.sum() >= 0.2 and mass.max() / mass.sum() >= 0.6:
        return options[int(mass.argmax())]
    acts = acts_of(intent)
    if "deny" in acts or (has_content(intent) and intent.top[0].p >= 0.5 and intent.top[0].label not in options):
        return SOMETHING_ELSE
    return None


def read_state(question: Question, intent: IntentResult) -> str | None:
    """The state a message gives a pending yes/no question: the act alone, else the answer in words."""
    acts = acts_of(intent)
    yes_no = [a for a in ("affirm", "deny") if a in acts and a in question.answers]
    if len(yes_no) == 1 and not has_content(intent):
        return question.answers[yes_no[0]]
    if intent.answer is not None and intent.answer.state is not None:
        return intent.answer.state
    if len(yes_no) == 1:
        return question.answers[yes_no[0]]
    return None


# --- splitting a message with two requests ----------------------------------------------------

_SPLIT = re.compile(r"(?:[.;!?]\s+|,?\s+\b(?:and also|also|plus|and then|as well as that|another thing)\b\s+|"
                    r",?\s+\band\b\s+(?=(?:i|my|can|could|how|what|why|where|when|is|do)\b)|"
                    r",\s+(?=not\b)|\s+(?=(?:rather than|instead of)\b))", re.IGNORECASE)
_NEGATED = re.compile(r"^(?:not|rather than|instead of)\b", re.IGNORECASE)
MIN_PART_WORDS = 2


def split_requests(text: str) -> list[str]:
    """Candidate parts of a message that may ask two things ("I lost my card and also need…") or say
    what it is not ("a transfer, not a card payment")."""
    parts = [p.strip(" ,.;") for p in _SPLIT.split(text) if p and p.strip(" ,.;")]
    parts = [p for p in parts if len(p.split()) >= MIN_PART_WORDS]
    return parts if len(parts) >= 2 else []


def is_negated(part: str) -> bool:
    return _NEGATED.match(part) is not None


def distinct_requests(pack: DomainPack, parts: list[IntentResult], min_p: float = 0.5) -> list[str]:
    """The confident, distinct in-scope goals of a message's parts, the most urgent first."""
    goals: list[str] = []
    for r in parts:
        top = r.top[0]
        if top.p >= min_p and top.label != pack.out_of_scope_label and top.label not in goals:
            goals.append(top.label)
    urgent = {i.name for i in pack.intents if i.urgent}
    return sorted(goals, key=lambda g: g not in urgent)  # stable: mention order within equal urgency


# --- planning a turn --------------------------------------------------------------------------


@dataclass
class TurnPlan:
    """What the ingress does with this turn before any decision is made."""

    evidence: SessionEvidence
    reply: str | None = None  # a reply that needs no decision (greeting, thanks, acknowledgement)
    reply_name: str = ""  # what that reply is, e.g. "greeting", "done:freeze_card"
    keep_pending: bool = False  # the pending question stays open (chit-chat in the middle of it)
    answered: str | None = None  # "variable=state" when the message answered the pending question
    prefix: str = ""  # said before the decided reply ("No problem." after "not sure")
    deferred: list[str] = field(default_factory=list)  # goals of this message kept for later
    undo: str | None = None  # a done action the customer takes back ("no, don't freeze it"): undo it, decide nothing
    notes: list[str] = field(default_factory=list)  # what the plan did, for the trace

    def trace(self) -> dict:
        out: dict = {"notes": self.notes}
        if self.answered:
            out["answered"] = self.answered
        if self.deferred:
            out["deferred"] = self.deferred
        return out


def question_text(pack: DomainPack, evidence: SessionEvidence, variable: str) -> str:
    if variable == GOAL_QUESTION:
        return disambiguation_text(pack, evidence.options)
    if variable.startswith(CONFIRM_PREFIX):
        return pack.actions[variable.removeprefix(CONFIRM_PREFIX)].confirm.text  # type: ignore[union-attr]
    return pack.question(variable).text


def _act_reply(pack: DomainPack, act: str) -> str:
    spec = pack.acts.get(act)  # type: ignore[call-overload]
    return (spec.reply if spec is not None else None) or pack.fallback_reply


def _retract_last(evidence: SessionEvidence, turn: int) -> list[str]:
    """Drop the evidence of the latest turn before `turn` that gave any; return what was dropped."""
    turns = [s.turn for s in evidence.soft] + list(evidence.hard_turn.values())
    last = max((t for t in turns if 0 < t < turn), default=None)
    if last is None:
        return []
    dropped = [s.label for s in evidence.soft if s.turn == last]
    evidence.soft = [s for s in evidence.soft if s.turn != last]
    for var in [v for v, t in evidence.hard_turn.items() if t == last]:
        dropped.append(f"answer: {var}={evidence.hard.pop(var, '?')}")
        evidence.hard_turn.pop(var)
    return dropped


def _not_goal(pack: DomainPack, goal: str, turn: int, said: bool = False) -> SoftEvidenceItem:
    keep = pack.dialogue.context.correction_likelihood
    what = f"the customer said it is not {goal}" if said else f"the customer corrected the answer about {goal}"
    return SoftEvidenceItem(
        variable=pack.intent_variable,
        likelihood={s: (keep if s == goal else 1.0) for s in goal_states(pack)},
        label=f"turn {turn}: {what}", turn=turn)


def plan_turn(session: SessionState, message: str, intent: IntentResult, reasoner: ReasonerResult,
              pack: DomainPack, parts: list[IntentResult] | None = None) -> TurnPlan:
    """Read the message in the context of the session: answer, act, correction, follow-up or new case."""
    turn = session.turns + 1
    acts, content = acts_of(intent), has_content(intent, pack.out_of_scope_label)
    if (content and acts & {"greeting", "thanks", "goodbye"} and intent.top[0].label == pack.out_of_scope_label
            and intent.content < CONFIDENT_INTENT):
        content = False  # "hi, I need some help please": a social act, nothing the domain can act on
    case = session.evidence.model_copy(deep=True)
    pending = session.pending_question
    plan = TurnPlan(evidence=case)

    if pending is not None:
        answered = _read_pending(pack, case, pending, message, intent, turn)
        if answered is not None:
            plan.answered = answered
            plan.notes.append(f"answer to the pending question: {answered}")
            if answered.endswith("=unsure"):
                plan.prefix = pack.dialogue.unsure
            # "Something else: …" and "no, …" go on to read the rest of the message.
            if not (content and (answered == f"{GOAL_QUESTION}={SOMETHING_ELSE}"
                                 or (answered.startswith(CONFIRM_PREFIX) and answered.endswith("=no")))):
                return plan
        elif not content and not acts & {"goodbye", "request_human", "correction"}:
            # Chit-chat, or nothing we could read: the question stays open and is asked again.
            act = next((a for a in SOCIAL_ACTS if a in acts), None)
            resume = pack.dialogue.resume.format(question=question_text(pack, case, pending))
            first = _act_reply(pack, act) if act else pack.dialogue.not_understood
            plan.reply, plan.reply_name, plan.keep_pending = f"{first} {resume}", act or "not_understood", True
            plan.notes.append(f"{act or 'no answer'} while {pending} is pending: the question stays open")
            return plan

    if pending is None and _takes_back(pack, session, intent, acts, content):
        plan.undo = session.last_action
        plan.reply_name = f"undo:{session.last_action}"
        plan.notes.append(f"{'/'.join(sorted(acts & {'deny', 'correction'}))} right after {session.last_action}: "
                          "undone, not decided again")
        return plan

    correcting = "correction" in acts or (
        "deny" in acts and pending is None and session.last_kind == "answer" and not acts & set(SOCIAL_ACTS))
    if not content and not correcting and "request_human" not in acts and plan.answered is None:
        social = next((a for a in (*SOCIAL_ACTS, "affirm", "deny", "unsure") if a in acts), None)
        if social in ("affirm", "thanks") and session.last_kind in ("action", "escalate"):
            return _acknowledge(pack, session, plan, social)
        if social is not None or session.turns > 0:
            # Nothing to decide on: an act's reply, or (mid-conversation) a request for more.
            plan.reply = _act_reply(pack, social) if social else pack.fallback_reply
            plan.reply_name = social or "not_understood"
            plan.notes.append(f"{social or 'no content'}: answered by template")
            return plan

    if content and acts & {"affirm", "thanks"} and pending is None and session.last_kind in ("action", "escalate"):
        # "yes please block it" once it is blocked: a confirmation, unless it clearly opens another topic.
        p_same = same_case_probability(pack, session.goal_belief, intent_likelihood(intent, pack))
        top = intent.top[0]
        vague = top.label == pack.out_of_scope_label or top.p < 0.5
        if p_same >= 0.5 or ("affirm" in acts and vague):  # "thanks, and X?" asks X
            plan.notes.append(f"confirmation of {session.last_action} (P(same topic)={p_same:.2f})")
            return _acknowledge(pack, session, plan, "affirm" if "affirm" in acts else "thanks")

    if correcting:
        _correct(pack, session, plan, turn)
    elif plan.answered is None and content:
        _continue_or_open(pack, session, plan, intent, turn)

    if content or (plan.answered is None and not correcting):  # "that's not what I meant" says nothing new
        _content_evidence(pack, plan, message, intent, reasoner, parts or [], turn)
    if "request_human" in acts and pack.dialogue.human_request:
        # Soft, at the act head's own odds: a clear request is near-certain evidence, a borderline one is weak.
        p = min(max(intent.acts["request_human"], 1e-6), 1 - 1e-6)
        plan.evidence.soft.append(SoftEvidenceItem(
            variable=pack.dialogue.human_request, likelihood={"yes": 1.0, "no": (1 - p) / p},
            label=f"turn {turn}: the customer asked for a person (p={p:.2f})", turn=turn))
        plan.notes.append("the customer asked for a person")
    return plan


def _takes_back(pack: DomainPack, session: SessionState, intent: IntentResult, acts: set[str], content: bool) -> bool:
    """"No, don't do that!" right after an action the executor confirmed, which the pack can undo; a message
    that clearly opens another topic is not a take-back."""
    last = session.last_action or ""
    spec = pack.actions.get(last)
    if spec is None or spec.undo is None or session.last_kind != "action" or last not in session.done_actions:
        return False
    if acts & {"affirm", "thanks"} or not ("correction" in acts or ("deny" in acts and content)):
        return False  # a bare "no" is too thin to unfreeze a card that may be at risk
    top = intent.top[0]
    new_topic = (content and top.p >= 0.5 and top.label != pack.out_of_scope_label
                 and same_case_probability(pack, session.goal_belief, intent_likelihood(intent, pack)) < 0.5)
    return not new_topic  # as for an open case: only a clear new topic is not about the action just done


def _content_evidence(pack: DomainPack, plan: TurnPlan, message: str, intent: IntentResult,
                      reasoner: ReasonerResult, parts: list[IntentResult], turn: int) -> None:
    """The message's intent and finding evidence; its parts decide which intent result speaks for it.

    A negated part ("…, not a card payment") is evidence against its goal; of two distinct requests
    the more urgent is the case and the other is deferred.
    """
    texts = split_requests(message) if parts else []
    negated = [r for t, r in zip(texts, parts, strict=False) if is_negated(t)]
    positive = [r for t, r in zip(texts, parts, strict=False) if not is_negated(t)]
    main = intent
    if negated and positive:
        main = positive[0]
        for r in negated:
            top = r.top[0]
            if top.label != pack.out_of_scope_label and top.label != main.top[0].label:
                plan.evidence.soft.append(_not_these(pack, r, turn))
                plan.notes.append(f"the customer said it is not {top.label} or the like")
    goals = distinct_requests(pack, positive)
    if len(goals) >= 2:
        main = next(r for r in positive if r.top[0].label == goals[0])
        plan.deferred = goals[1:]
        plan.notes.append(f"two requests: {goals[0]} first, {', '.join(goals[1:])} kept for later")
    plan.evidence.soft.append(intent_evidence(main, pack, turn))
    plan.evidence.soft.extend(finding_evidence(reasoner, pack, turn))


def _not_these(pack: DomainPack, negated: IntentResult, turn: int) -> SoftEvidenceItem:
    """"…, not a top-up": evidence against the goals the negated words point to, in proportion to how much."""
    q = intent_likelihood(negated, pack)  # max 1: the negated part's most likely goal
    keep = pack.dialogue.context.correction_likelihood
    lam = 1.0 - (1.0 - keep) * q
    return SoftEvidenceItem(
        variable=pack.intent_variable, likelihood={s: float(x) for s, x in zip(goal_states(pack), lam, strict=True)},
        label=f"turn {turn}: the customer said it is not {negated.top[0].label} (or its like)", turn=turn)


def _read_pending(pack: DomainPack, case: SessionEvidence, pending: str, message: str, intent: IntentResult,
                  turn: int) -> str | None:
    """Enter the answer to the pending question, if the message is one; return "variable=state"."""
    if pending == GOAL_QUESTION:
        choice = read_option(pack, case.options, message, intent) if case.options else None
        if choice is None:
            return None if "unsure" not in acts_of(intent) else _unsure(case, pending)
        case.soft.append(option_evidence(pack, case.options, choice, turn))
        return f"{GOAL_QUESTION}={choice}"
    if pending.startswith(CONFIRM_PREFIX):
        acts = acts_of(intent)
        yes_no = [a for a in ("affirm", "deny") if a in acts]
        if len(yes_no) != 1:
            return _unsure(case, pending) if "unsure" in acts else None
        action, agreed = pending.removeprefix(CONFIRM_PREFIX), yes_no[0] == "affirm"
        case.soft.append(confirmation_evidence(pack, action, agreed, turn))
        (case.agreed if agreed else case.unavailable).append(action)
        return f"{pending}={'yes' if agreed else 'no'}"
    question = pack.question(pending)
    state = read_state(question, intent)
    if state is None:
        return _unsure(case, pending) if "unsure" in acts_of(intent) else None
    case.hard[question.variable] = state
    case.hard_turn[question.variable] = turn
    return f"{question.variable}={state}"


def _unsure(case: SessionEvidence, pending: str) -> str:
    # "Not sure" is an answer that carries no evidence: the question stays asked, the policy moves on.
    case.unsure.append(pending)
    return f"{pending}=unsure"


def _acknowledge(pack: DomainPack, session: SessionState, plan: TurnPlan, act: str) -> TurnPlan:
    action = pack.actions.get(session.last_action or "")
    # "thanks" is just thanks; "done" only for what the executor confirmed.
    done = (action.done_reply if action is not None and act != "thanks" and session.last_action in session.done_actions
            else None)
    plan.reply = done or _act_reply(pack, act)
    plan.reply_name = f"done:{session.last_action}" if done else act
    plan.notes.append(f"{act} after {session.last_action}: acknowledged, not repeated")
    return plan


def _correct(pack: DomainPack, session: SessionState, plan: TurnPlan, turn: int) -> None:
    """Retract the corrected turn's evidence; a closed case is reopened without it."""
    case = plan.evidence
    reopened = not case.soft and not case.hard and session.previous is not None
    if reopened:
        case = plan.evidence = session.previous.model_copy(deep=True)  # type: ignore[union-attr]
        case.asked, case.unsure, case.options = [], [], []
    dropped = _retract_last(case, turn)
    plan.notes.append("correction: " + ("reopened the last case, " if reopened else "")
                      + (f"retracted {dropped}" if dropped else "nothing to retract"))
    if session.last_kind == "answer" and session.last_target:
        case.soft.append(_not_goal(pack, session.last_target, turn))


def _continue_or_open(pack: DomainPack, session: SessionState, plan: TurnPlan, intent: IntentResult,
                      turn: int) -> None:
    """New content: continue the open case, or open a new one (from the transition prior when one just closed)."""
    case = plan.evidence
    lam = intent_likelihood(intent, pack)
    if case.soft or case.hard:
        p_same = same_case_probability(pack, session.goal_belief, lam)
        top = intent.top[0]
        clear = top.p >= 0.5 and top.label != pack.out_of_scope_label
        if p_same >= 0.5 or not clear:
            # Only a clear new topic opens a new case; a vague message is read against the open one.
            plan.notes.append(f"same case (P(same topic)={p_same:.2f}, top {top.label} {top.p:.2f})")
            return
        plan.evidence = SessionEvidence()
        plan.notes.append(f"new case: change of topic (P(same topic)={p_same:.2f})")
        return
    if session.goal_belief and session.last_kind in TERMINAL_KINDS:
        item = context_evidence(pack, session.goal_belief, turn)
        plan.evidence.soft.append(item)
        plan.notes.append(f"new case in the context of the last one: {item.label}")


def close_or_continue(session: SessionState, plan: TurnPlan, decision: DecisionResult | None, pack: DomainPack,
                      done: list[str] | None = None) -> None:
    """Update the session after a turn: a terminal action closes the case, a question keeps it open.

    `done`: the actions the executor confirmed this turn; None (no executor, e.g. the simulator) counts the
    decided action as done.
    """
    evidence = plan.evidence
    if decision is None:
        session.evidence = evidence
        if not plan.keep_pending:
            session.pending_question = None
        if plan.reply_name == "goodbye" and (evidence.soft or evidence.hard):
            session.previous, session.evidence = evidence, SessionEvidence()
        return
    if decision.kind == "ask":
        evidence.asked.append(decision.target or "")
        if decision.target == GOAL_QUESTION:
            evidence.options = list(decision.options)
        session.evidence = evidence
        session.pending_question = decision.target
    else:
        session.previous, session.evidence = evidence, SessionEvidence()
        session.pending_question = None
        confirmed = ([decision.action] if decision.kind in ("action", "escalate") else []) if done is None else done
        session.done_actions += [a for a in confirmed if a not in session.done_actions]
        session.last_target = decision.target
    session.deferred = [g for g in [*session.deferred, *plan.deferred] if g != decision.target]
    session.goal_belief = dict(decision.posterior.get(pack.intent_variable, {}))
    session.last_action, session.last_kind = decision.action, decision.kind


# --- reply templates --------------------------------------------------------------------------


def reply_template(pack: DomainPack, decision: DecisionResult) -> tuple[str, list[str]]:
    """The content the reply must carry, and the texts it must not contain (other intents' answers)."""
    others = [i.faq for i in pack.intents if i.name != decision.target]
    if decision.kind == "answer" and decision.target:
        return pack.intent(decision.target).faq, others
    if decision.kind == "ask" and decision.question:
        return decision.question, others
    if decision.kind == "decline":
        return pack.out_of_scope_reply, others
    template = pack.actions[decision.action].reply if decision.action in pack.actions else None
    return template or pack.fallback_reply, others


def deferred_text(pack: DomainPack, goal: str) -> str:
    intent = pack.intent(goal)
    return pack.dialogue.deferred.format(title=intent.title, faq=intent.faq)
