"""A Rasa-style baseline agent: intent thresholds, a two-stage fallback and hand-written rules.

What a Rasa developer would build for the same bank, on the same intent model and act readings (the
``IntentResult`` the live IntentActor sends), run by ``graphs.simulator`` against the same simulated users:

- **FallbackClassifier** (Rasa's ``FallbackClassifier``): the message falls back when the top intent's
  confidence is below ``threshold`` (Rasa's default 0.3) or when the top two are closer than
  ``ambiguity_threshold`` (default 0.1).
- **TwoStageFallback** (Rasa's ``action_two_stage_fallback``): on a fallback the bot asks the customer to
  confirm the top intent ("Did you mean X?"). Affirm: X is handled. Anything else: the bot asks to rephrase;
  a confident rephrase is handled, a second fallback asks to confirm its top intent again, and a second
  "no" hands the conversation over to a person (Rasa's ultimate fallback, here the escalate action).
- **Rules** (what a Rasa project writes in ``rules.yml``): a request for a person (the act classifier's
  ``request_human``) escalates; an out-of-scope top intent declines; a top intent of ``lost_or_stolen_card``
  or ``compromised_card`` freezes the card (the one card-safety rule a Rasa developer would write for this
  bank: Rasa has no notion of a card being at risk behind other intents, e.g. an unrecognised payment);
  greetings / thanks / goodbyes without content get a template reply; every other confident intent is
  answered with its FAQ.

No value of information, no Bayesian network, no findings: the bot answers the top intent directly when it
is confident, so it never asks the pack's questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coact.graphs.policy.dialogue import SOCIAL_ACTS, acts_of, has_content
from coact.graphs.policy.domain import DomainPack
from coact.graphs.policy.simulator import Message, Reply

FALLBACK_THRESHOLD = 0.3  # Rasa FallbackClassifier `threshold` default
AMBIGUITY_THRESHOLD = 0.1  # Rasa FallbackClassifier `ambiguity_threshold` default
FREEZE_INTENTS = ("lost_or_stolen_card", "compromised_card")
CONFIRM = "confirm"  # "Did you mean X?" (options: [X])
REPHRASE = "rephrase"  # "Sorry, could you rephrase that?"


@dataclass
class RasaState:
    stage: str | None = None  # None | "confirm1" | "rephrase" | "confirm2"
    intent: str | None = None  # the intent being confirmed


def falls_back(top: Sequence, threshold: float = FALLBACK_THRESHOLD,
               ambiguity_threshold: float = AMBIGUITY_THRESHOLD) -> bool:
    """Rasa's FallbackClassifier on a ranked intent list (``ScoredLabel``s, best first)."""
    if not top:
        return True
    second = top[1].p if len(top) > 1 else 0.0
    return top[0].p < threshold or top[0].p - second < ambiguity_threshold


class RasaAgent:
    """A Rasa-style bot (see the module docstring), with the simulator's ``Agent`` interface."""

    name = "rasa"

    def __init__(self, pack: DomainPack, threshold: float = FALLBACK_THRESHOLD,
                 ambiguity_threshold: float = AMBIGUITY_THRESHOLD,
                 freeze_intents: Sequence[str] = FREEZE_INTENTS) -> None:
        self.pack = pack
        self.threshold = threshold
        self.ambiguity_threshold = ambiguity_threshold
        self.freeze_intents = tuple(i for i in freeze_intents if "freeze_card" in pack.actions)

    def start(self) -> RasaState:
        return RasaState()

    def act_on(self, intent: str) -> Reply:
        """The rule or the FAQ answer for a (confirmed or confident) intent."""
        if intent == self.pack.out_of_scope_label:
            return Reply("decline", "decline")
        if intent in self.freeze_intents:
            return Reply("action", "freeze_card")
        return Reply("answer", f"answer:{intent}", intent)

    def turn(self, state: RasaState, message: Message) -> Reply:
        intent = message.intent
        acts, content = acts_of(intent), has_content(intent)
        if "request_human" in acts:
            state.stage = state.intent = None
            return Reply("escalate", "escalate")
        if state.stage in ("confirm1", "confirm2"):
            if "affirm" in acts and "deny" not in acts:
                confirmed, state.stage, state.intent = state.intent, None, None
                return self.act_on(confirmed or self.pack.out_of_scope_label)
            if state.stage == "confirm2":
                state.stage = state.intent = None
                return Reply("escalate", "escalate")
            state.stage, state.intent = REPHRASE, None
            return Reply("ask", f"ask:{REPHRASE}", REPHRASE)
        if not content:
            social = next((a for a in SOCIAL_ACTS if a in acts), None)
            if social is not None:
                return Reply("chitchat", social)
        if not falls_back(intent.top, self.threshold, self.ambiguity_threshold):
            state.stage = state.intent = None
            return self.act_on(intent.top[0].label)
        state.stage = "confirm2" if state.stage == REPHRASE else "confirm1"
        state.intent = intent.top[0].label
        return Reply("ask", f"ask:{CONFIRM}", CONFIRM, (state.intent,))
