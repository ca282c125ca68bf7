"""Domain packs: everything domain-specific (intents, findings, network, utilities, texts) as data.

A pack is one YAML file validated by pydantic; a bad field fails on load with its path named.
`build_network` and `build_actions` turn a pack into the plain objects the policy consumes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from coact.graphs.policy.bayesnet import BayesNet
from coact.graphs.policy.decide import ActionSpec, QuestionSpec
from coact.graphs.policy.messages import ActName

DOMAINS_DIR = Path(__file__).parent / "domains"
INTENT_STATES = "intents"  # `states: intents` expands to the pack's intents plus the out-of-scope label


class DomainPackError(ValueError):
    """A domain pack failed validation; the message names the offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Intent(_Strict):
    name: str
    group: str
    title: str = Field(description="short human name, used in replies and traces")
    faq: str = Field(min_length=10, description="the FAQ answer: the knowledge passage for this intent")
    urgent: bool = Field(default=False, description="handled first when a message asks for two things")
    related_groups: list[str] = Field(default_factory=list,
                                      description="other groups a follow-up question often moves to")
    also_answers: list[str] = Field(default_factory=list,
                                    description="intents whose question this FAQ answers too (overlapping content)")


class ActExample(_Strict):
    """A training message for the act classifier (``coact prepare``'s ``acts`` part), with what else it does."""

    text: str = Field(min_length=1)
    also: list[ActName] = Field(default_factory=list, description="other acts the message performs too")
    content: bool | None = Field(default=None, description="carries domain content beyond the act; None: "
                                 "either reading is fine (not trained on)")
    pending: bool | None = Field(default=None, description="only read with (True) or without (False) a pending "
                                 "question; None: trained both ways")


class Act(_Strict):
    """A conversation act (affirm, deny, thanks…): examples the act classifier learns from, and its reply."""

    examples: list[str | ActExample] = Field(min_length=10, description="the act alone (no domain content)")
    with_content: list[str | ActExample] = Field(default_factory=list,
                                                 description="the act plus domain content (\"yes, please freeze it\")")
    reply: str | None = None

    def items(self) -> list[ActExample]:
        """Every example as an ActExample: ``examples`` default to no content, ``with_content`` to content."""
        out = []
        for entries, content in ((self.examples, False), (self.with_content, True)):
            for e in entries:
                if isinstance(e, str):
                    out.append(ActExample(text=e, content=content))
                elif e.content is None and "content" not in e.model_fields_set:
                    out.append(e.model_copy(update={"content": content}))
                else:
                    out.append(e)
        return out


class Finding(_Strict):
    """An observable variable estimated from text by the Reasoner: y = sigmoid(f(x))."""

    name: str
    description: str
    positive_intents: list[str] = Field(default_factory=list)
    keywords: list[str] = Field(default_factory=list)
    positive_examples: list[str] = Field(default_factory=list)
    negative_examples: list[str] = Field(default_factory=list)


class CptRow(_Strict):
    when: dict[str, str | list[str]]
    probs: list[float]


class Cpt(_Strict):
    default: list[float] | Literal["uniform"] = "uniform"
    rows: list[CptRow] = Field(default_factory=list)
    state_weights: dict[str, float] = Field(default_factory=dict, description="root nodes: prior proportional to weights")


class Variable(_Strict):
    name: str
    states: list[str] | Literal["intents"]
    parents: list[str] = Field(default_factory=list)
    cpt: Cpt = Field(default_factory=Cpt)
    description: str = ""


class Question(_Strict):
    variable: str
    text: str
    why: str | None = Field(default=None, description="why it is asked: the reason clause of the question")
    answers: dict[str, str] = Field(description="act (affirm/deny) -> state of the variable")
    answer_examples: dict[str, list[str]] = Field(
        default_factory=dict, description="state -> answers in words (\"it was declined\"), read by the IntentActor")


class UtilityTerm(_Strict):
    on: str
    values: dict[str, str | float] = Field(default_factory=dict)
    match: str | float | None = Field(default=None, description="answer actions: utility when the goal is the answered intent")
    related: str | float | None = Field(
        default=None, description="answer actions: utility when the goal is another intent of the answered one's group")
    covers: str | float | None = Field(
        default=None, description="answer actions: utility when the answered intent's FAQ also answers the goal")
    otherwise: str | float = 0.0


class Executor(_Strict):
    """Who carries an action out: a webhook named in the Serve config (`actions.webhooks`), or a Python function."""

    webhook: str | None = Field(default=None, description="a key of the Serve config's actions.webhooks")
    python: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                               description="'module:function', called with the ActionCall; returns an ActionOutcome")

    @model_validator(mode="after")
    def _one(self) -> Executor:
        if (self.webhook is None) == (self.python is None):
            raise ValueError("give exactly one of webhook, python")
        return self


class Confirmation(_Strict):
    """Asking before acting ("Shall I freeze your card now?"): an askable option valued by VOI like any question.

    The answer is read as evidence on `variable` (a customer whose card is at risk agrees more often than one whose
    card is safe); a "no" also takes the action off the table for the case, so a declined action never runs.
    """

    text: str = Field(min_length=5)
    why: str | None = Field(default=None, description="why it is asked first: the reason clause of the question")
    variable: str = Field(description="the hidden variable the answer speaks to")
    affirm: dict[str, float] = Field(description="P(the customer agrees | state), per state of `variable`")


class Undo(_Strict):
    """How the customer takes a done action back ("no, don't freeze it!"): another action of the same executor."""

    action: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="the executor's action that reverses it")
    reply: str = Field(description="after the executor said done; {reference}")
    failed_reply: str


class ActionTemplate(_Strict):
    kind: Literal["answer", "action", "escalate", "decline"]
    reply: str | None = Field(default=None, description="template reply (after the executor said done; "
                              "{reference}: its reference); answer actions use the intent's FAQ")
    done_reply: str | None = Field(default=None, description="reply when the customer confirms it after it was done")
    executor: Executor | None = Field(default=None, description="what carries it out; None: nothing to execute")
    confirm: Confirmation | None = Field(default=None, description="high impact: the option to ask first")
    refused_reply: str | None = Field(default=None, description="the executor refused; {reason}")
    failed_reply: str | None = Field(default=None, description="the executor could not be reached or failed")
    undo: Undo | None = Field(default=None, description="what reverses it when the customer says no right after")
    utility: list[UtilityTerm]

    @model_validator(mode="after")
    def _replies(self) -> ActionTemplate:
        if self.executor is not None and (not self.reply or not self.failed_reply):
            raise ValueError("an action with an executor needs reply and failed_reply (the reply follows the result)")
        if self.undo is not None and self.executor is None:
            raise ValueError("undo: only an action with an executor can be undone (by the same executor)")
        return self


class MoodCost(_Strict):
    """A question costs more when the customer is in a given state (an upset customer's time is dearer)."""

    variable: str
    state: str
    weight: str | float = Field(description="extra cost at P(state) = 1, added in proportion to P(state)")
    exempt: list[str] = Field(default_factory=list, description="questions that cost no more (offering a person)")


class Utilities(_Strict):
    weights: dict[str, float]
    max_questions: int = 2
    mood_cost: MoodCost | None = None


class Context(_Strict):
    """How a case's topic carries over to the next message (a small transition model over the goal)."""

    stay_same: float = Field(default=0.45, ge=0, le=1, description="after a closed case: P(next goal = same goal)")
    stay_group: float = Field(default=0.25, ge=0, le=1, description="after a closed case: P(another goal of its group)")
    same_case: float = Field(default=0.5, gt=0, lt=1, description="open case: prior that a new message continues it")
    correction_likelihood: float = Field(default=0.1, gt=0, le=1,
                                         description="likelihood kept by a goal the customer corrected away from")

    @model_validator(mode="after")
    def _check_mass(self) -> Context:
        if self.stay_same + self.stay_group > 1:
            raise ValueError("stay_same + stay_group must be at most 1")
        return self


class Disambiguation(_Strict):
    """A question over the goal's top candidates, valued by VOI like the pack's own questions."""

    text: str = Field(description="{options}: the candidates' titles, joined")
    max_options: int = Field(default=3, ge=2)
    min_share: float = Field(default=0.08, gt=0, lt=1, description="a candidate's least posterior to be offered")
    noise: float = Field(default=0.05, gt=0, lt=0.5, description="P(the customer picks an option that is not their goal)")
    something_else: str = "something else"


class Dialogue(_Strict):
    finding_weight: float = Field(
        default=0.5, ge=0, le=1,
        description="exponent of a finding's likelihood when it depends on the goal the intent model already reads")
    context: Context = Field(default_factory=Context)
    human_request: str | None = Field(
        default=None, description="observed variable set to 'yes' when the act classifier reads a request for a person")
    disambiguation: Disambiguation
    resume: str = Field(description="re-asks a pending question after chit-chat; {question}")
    deferred: str = Field(description="offers a goal kept from an earlier message; {title}, {faq}")
    unsure: str = Field(description="acknowledges a 'not sure' answer before moving on")
    not_understood: str = Field(description="said before re-asking a pending question the message did not answer")


class Reasons(_Strict):
    """The reason clause every act/ask/escalate/decline reply carries (graphs/policy/reasons.py).

    It is rendered from the decision's explanation: the piece of evidence that moved the decision most towards
    what was chosen, phrased by what it says about its variable. The LM never writes it.
    """

    sentence: dict[Literal["action", "escalate", "decline", "ask"], str] = Field(
        description="the clause per decision kind; {reason} is the evidence phrase")
    evidence: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="variable -> state the evidence points to -> what the customer told us")
    goal: str = Field(description="the intent evidence pointed to a goal; {title}")
    out_of_scope: str = Field(description="the intent evidence pointed out of scope")
    disambiguation: str = Field(description="why a which-one question is asked")
    fallback: str = Field(description="no evidence phrase applies (the prior decided)")
    understood: str = Field(description="an answer at low confidence says what was understood; {title}")
    low_confidence: float = Field(default=0.6, gt=0, lt=1, description="an answer below this posterior says "
                                  "what was understood")


class PromptExample(_Strict):
    customer: str
    reply: str


class Prompts(_Strict):
    system: str
    opener: str = Field(description="user turn; {message} is the customer's message, {action} what happens next")
    examples: list[PromptExample] = Field(default_factory=list, description="few-shot turns for small models")
    reply_prefix: str = Field(default="", description="the reply's first words, fed to the model (steers small models)")


class DomainPack(_Strict):
    name: str
    version: str
    description: str
    intent_variable: str
    out_of_scope_label: str = "out_of_scope"
    out_of_scope_reply: str
    fallback_reply: str
    intents: list[Intent] = Field(min_length=2)
    acts: dict[ActName, Act] = Field(description="every conversation act, with its examples and reply")
    findings: list[Finding]
    variables: list[Variable]
    questions: list[Question]
    actions: dict[str, ActionTemplate]
    utilities: Utilities
    dialogue: Dialogue
    reasons: Reasons
    prompts: Prompts

    @model_validator(mode="after")
    def _check_references(self) -> DomainPack:
        names = [i.name for i in self.intents]
        if len(set(names)) != len(names):
            raise ValueError("intents: duplicate intent names")
        groups = {i.group for i in self.intents}
        for i in self.intents:
            unknown_answers = set(i.also_answers) - set(names)
            if unknown_answers:
                raise ValueError(f"intents.{i.name}.also_answers: unknown intents {sorted(unknown_answers)}")
            unknown_groups = set(i.related_groups) - groups
            if unknown_groups:
                raise ValueError(f"intents.{i.name}.related_groups: unknown groups {sorted(unknown_groups)}")
        variables = {v.name: v for v in self.variables}
        if self.intent_variable not in variables:
            raise ValueError(f"intent_variable: {self.intent_variable!r} is not a variable")
        for f in self.findings:
            if f.name not in variables:
                raise ValueError(f"findings.{f.name}: no network variable of that name")
            unknown = set(f.positive_intents) - set(names)
            if unknown:
                raise ValueError(f"findings.{f.name}.positive_intents: unknown intents {sorted(unknown)}")
        for v in self.variables:
            for p in v.parents:
                if p not in variables:
                    raise ValueError(f"variables.{v.name}.parents: unknown variable {p!r}")
        missing_acts = [a for a in get_args(ActName) if a not in self.acts]
        if missing_acts:
            raise ValueError(f"acts: missing {missing_acts} (every act needs examples)")
        for q in self.questions:
            if q.variable not in variables:
                raise ValueError(f"questions.{q.variable}: no network variable of that name")
            own = self.states_of(variables[q.variable])
            for state, examples in q.answer_examples.items():
                if state not in own:
                    raise ValueError(f"questions.{q.variable}.answer_examples: {state!r} is not a state of "
                                     f"{q.variable} (states: {own})")
                if not examples:
                    raise ValueError(f"questions.{q.variable}.answer_examples.{state}: no examples")
        for var, phrases in self.reasons.evidence.items():
            if var not in variables:
                raise ValueError(f"reasons.evidence.{var}: no network variable of that name")
            own = self.states_of(variables[var])
            bad_states = sorted(set(phrases) - set(own))
            if bad_states:
                raise ValueError(f"reasons.evidence.{var}: {bad_states} are not states of {var} (states: {own})")
        for kind, text in self.reasons.sentence.items():
            if "{reason}" not in text:
                raise ValueError(f"reasons.sentence.{kind}: must contain {{reason}}")
        for key, action in self.actions.items():
            confirm = action.confirm
            if confirm is not None:
                cv = variables.get(confirm.variable)
                if cv is None:
                    raise ValueError(f"actions.{key}.confirm.variable: no network variable {confirm.variable!r}")
                own = self.states_of(cv)
                if set(confirm.affirm) != set(own):
                    raise ValueError(f"actions.{key}.confirm.affirm: give P(agree) for exactly the states {own}")
                bad = {s: p for s, p in confirm.affirm.items() if not 0 < p < 1}
                if bad:
                    raise ValueError(f"actions.{key}.confirm.affirm: probabilities must be in (0, 1), got {bad}")
            for term in action.utility:
                if term.on not in variables:
                    raise ValueError(f"actions.{key}.utility: unknown variable {term.on!r}")
                for ref in [*term.values.values(), term.match, term.related, term.covers, term.otherwise]:
                    if isinstance(ref, str) and ref not in self.utilities.weights:
                        raise ValueError(f"actions.{key}.utility: unknown weight {ref!r}")
        mood = self.utilities.mood_cost
        if mood is not None:
            mv = variables.get(mood.variable)
            if mv is None or mood.state not in self.states_of(mv):
                raise ValueError(f"utilities.mood_cost: {mood.variable}={mood.state} is not a variable's state")
            if isinstance(mood.weight, str) and mood.weight not in self.utilities.weights:
                raise ValueError(f"utilities.mood_cost.weight: unknown weight {mood.weight!r}")
        if self.dialogue.human_request is not None:
            hr = variables.get(self.dialogue.human_request)
            if hr is None or "yes" not in self.states_of(hr):
                raise ValueError(f"dialogue.human_request: {self.dialogue.human_request!r} is not a variable "
                                 "with a 'yes' state")
        if sum(a.kind == "answer" for a in self.actions.values()) != 1:
            raise ValueError("actions: exactly one action template of kind 'answer' is required")
        return self

    def states_of(self, variable: Variable) -> list[str]:
        if variable.states == INTENT_STATES:
            return [i.name for i in self.intents] + [self.out_of_scope_label]
        return list(variable.states)

    def intent(self, name: str) -> Intent:
        for i in self.intents:
            if i.name == name:
                return i
        raise KeyError(name)

    def question(self, variable: str) -> Question:
        for q in self.questions:
            if q.variable == variable:
                return q
        raise KeyError(variable)


class _PackLoader(yaml.SafeLoader):
    """YAML 1.2 booleans only: `yes`/`no` stay strings, as state names must."""


_PackLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(parts)


def parse_pack(text: str, source: str = "<string>") -> DomainPack:
    try:
        data = yaml.load(text, Loader=_PackLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        raise DomainPackError(f"{source}: not valid YAML: {e}") from e
    try:
        pack = DomainPack.model_validate(data)
    except ValidationError as e:
        raise DomainPackError(f"{source}: {_format_error(e)}") from e
    try:
        build_network(pack)
        build_actions(pack, pack.utilities.weights)
    except (ValueError, KeyError) as e:
        raise DomainPackError(f"{source}: {e}") from e
    return pack


def resolve_pack_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"}:
        return path
    return DOMAINS_DIR / f"{name_or_path}.yaml"


@lru_cache(maxsize=8)
def load_pack(name_or_path: str | Path = "banking") -> DomainPack:
    path = resolve_pack_path(name_or_path)
    if not path.exists():
        raise DomainPackError(f"domain pack {str(name_or_path)!r} not found at {path}")
    return parse_pack(path.read_text(encoding="utf-8"), str(path))


def _cpt_array(pack: DomainPack, var: Variable, states: dict[str, list[str]]) -> np.ndarray:
    own = states[var.name]
    parent_states = [states[p] for p in var.parents]
    shape = tuple(len(s) for s in parent_states) + (len(own),)
    where = f"variables.{var.name}.cpt"

    def check(probs: list[float], field: str) -> np.ndarray:
        arr = np.asarray(probs, dtype=float)
        if arr.shape != (len(own),):
            raise ValueError(f"{field}: expected {len(own)} probabilities for states {own}, got {len(probs)}")
        if np.any(arr < 0) or not np.isclose(arr.sum(), 1.0, atol=1e-6):
            raise ValueError(f"{field}: probabilities must be non-negative and sum to 1 (sum={arr.sum():.6f})")
        return arr / arr.sum()

    if not var.parents:
        if var.cpt.state_weights:
            unknown = set(var.cpt.state_weights) - set(own)
            if unknown:
                raise ValueError(f"{where}.state_weights: unknown states {sorted(unknown)}")
            w = np.array([var.cpt.state_weights.get(s, 1.0) for s in own], dtype=float)
            return w / w.sum()
        if var.cpt.default == "uniform":
            return np.full(len(own), 1.0 / len(own))
        return check(var.cpt.default, f"{where}.default")

    default = (
        np.full(len(own), 1.0 / len(own)) if var.cpt.default == "uniform" else check(var.cpt.default, f"{where}.default")
    )
    table = np.broadcast_to(default, shape).copy()
    # Rows apply in order; a later row overrides an earlier one where both match.
    for r, row in enumerate(var.cpt.rows):
        probs = check(row.probs, f"{where}.rows.{r}.probs")
        index: list[object] = []
        for p, p_states in zip(var.parents, parent_states, strict=True):
            wanted = row.when.get(p)
            if wanted is None:
                index.append(slice(None))
                continue
            wanted_list = [wanted] if isinstance(wanted, str) else wanted
            bad = [w for w in wanted_list if w not in p_states]
            if bad:
                raise ValueError(f"{where}.rows.{r}.when.{p}: unknown states {bad}")
            index.append([p_states.index(w) for w in wanted_list])
        extra = set(row.when) - set(var.parents)
        if extra:
            raise ValueError(f"{where}.rows.{r}.when: {sorted(extra)} are not parents of {var.name}")
        table[np.ix_(*[np.arange(len(s)) if isinstance(i, slice) else np.asarray(i)
                       for i, s in zip(index, parent_states, strict=True)])] = probs
    return table


def build_network(pack: DomainPack) -> BayesNet:
    states = {v.name: pack.states_of(v) for v in pack.variables}
    parents = {v.name: list(v.parents) for v in pack.variables}
    cpts = {v.name: _cpt_array(pack, v, states) for v in pack.variables}
    return BayesNet(states=states, parents=parents, cpts=cpts)


def _weight(ref: str | float | None, weights: dict[str, float]) -> float:
    if ref is None:
        return 0.0
    return float(weights[ref]) if isinstance(ref, str) else float(ref)


def build_actions(pack: DomainPack, weights: dict[str, float]) -> list[ActionSpec]:
    """Expand action templates into utility tables; the answer template gives one action per intent."""
    states = {v.name: pack.states_of(v) for v in pack.variables}
    group_of = {i.name: i.group for i in pack.intents}
    by_name = {i.name: i for i in pack.intents}
    members: dict[str, list[str]] = {}
    for i in pack.intents:
        members.setdefault(i.group, []).append(i.name)
    specs: list[ActionSpec] = []
    for key, template in pack.actions.items():
        targets = [i.name for i in pack.intents] if template.kind == "answer" else [None]
        for target in targets:
            on = tuple(dict.fromkeys(t.on for t in template.utility))
            shape = tuple(len(states[v]) for v in on)
            table = np.zeros(shape)
            for term in template.utility:
                axis = on.index(term.on)
                vec = np.full(len(states[term.on]), _weight(term.otherwise, weights))
                for state, ref in term.values.items():
                    if state not in states[term.on]:
                        raise ValueError(f"actions.{key}.utility.values: unknown state {state!r} of {term.on}")
                    vec[states[term.on].index(state)] = _weight(ref, weights)
                if term.related is not None and target is not None:
                    # A sibling's FAQ often helps (same group): worth more than a wrong answer, less than the right one.
                    for sibling in members.get(group_of.get(target, ""), []):
                        if sibling != target and sibling in states[term.on]:
                            vec[states[term.on].index(sibling)] = _weight(term.related, weights)
                if term.covers is not None and target is not None:
                    for covered in by_name[target].also_answers:
                        vec[states[term.on].index(covered)] = _weight(term.covers, weights)
                if term.match is not None and target is not None:
                    vec[states[term.on].index(target)] = _weight(term.match, weights)
                table = table + vec.reshape([-1 if a == axis else 1 for a in range(len(on))])
            name = f"answer:{target}" if target else key
            specs.append(ActionSpec(name=name, kind=template.kind, on=on, utility=table, target=target))
    return specs


def build_questions(pack: DomainPack) -> list[QuestionSpec]:
    return [QuestionSpec(variable=q.variable, text=q.text) for q in pack.questions]
