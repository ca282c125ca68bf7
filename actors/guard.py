"""Checks a generated reply against the decision before it is sent.

The decision is fixed before generation; the language model may only phrase around the
template content. Anything that adds a fact, a question, an action that was not decided or
another intent's answer is rejected, and the template reply is sent instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from coact.graphs.policy.messages import DecisionResult

MAX_OPENER_CHARS = 160
NGRAM = 5
# Words that claim an action. Allowed only when that action was decided.
ACTION_CLAIMS: dict[str, set[str]] = {
    "freeze": {"freeze", "froze", "frozen", "freezing", "blocked", "locked"},
    "escalate": {"agent", "human", "colleague", "transfer you", "connect", "connecting", "specialist"},
    "refund": {"refund", "refunded", "reimburse", "reimbursed", "compensate"},
}
ALLOWED_CLAIMS = {"freeze_card": {"freeze"}, "escalate": {"escalate"}}
# A small model drifts into refusals and talking about itself; neither may reach a customer.
OFF_SCRIPT = {"unable", "cannot", "can't", "ai", "model", "assistant", "sorry for your loss", "mistake",
              "as an", "apologize for any confusion", "my responses", "i am not able"}
# Words an acknowledgement may use beyond those of the customer's message and the decided content.
COURTESY = set("""
a an the i i'm i'll we we're we'll you you're your yours it it's this that these those to of for with about on in
and or but so as at by be is are was am been being do does did have has had will would can could shall should may
sorry hear hearing understand understood see thanks thank glad happy help helping assist here sure certainly
absolutely of course let's let me us our together look looking into sort sorted out right away now
no problem worry worries concern concerns question questions request message reaching contacting get back
wait waiting frustrating frustration inconvenience stressful difficult trouble hassle patience please apologise apologize
know knowing appreciate really very much just all everything okay ok great good fine noted
any anything else more information details provide need needs possible way ways today there here
don't do not can i'd i've we've you've what how when where which who why if also too
""".split())
_WORD = re.compile(r"[a-z0-9']+")
_SENTENCE_END = re.compile(r"(?<=[.!])\s")


def _stem(word: str) -> str:
    # Crude suffix stripping: "arrived"/"arrives"/"arriving" all match "arrive".
    for suffix in ("ing", "ed", "es", "s", "e"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def first_sentence(text: str) -> str:
    text = " ".join(text.replace("\n", " ").split())
    parts = _SENTENCE_END.split(text, maxsplit=1)
    return parts[0].strip() if parts else ""


@lru_cache(maxsize=4096)
def _ngrams(text: str, n: int = NGRAM) -> frozenset[tuple[str, ...]]:
    # Cached: the forbidden texts are the domain's FAQ answers, the same on every turn.
    words = _WORD.findall(text.lower())
    return frozenset(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _judge(text: str, words: list[str], decision: DecisionResult, forbidden: list[str], grounding: str | None,
           whole: bool, confirmed: Sequence[str] | None = None) -> str | None:
    """The checks of an opener, whole or a streamed prefix of one (`whole`: it must end its sentence).

    `words` are the words judged: in a prefix, the last word while it is still being generated is not.
    `confirmed`: the actions the executor said are done, the only ones a reply may claim (None: the decided one).
    """
    if len(text) > MAX_OPENER_CHARS:
        return "too long"
    if "?" in text:
        return "asks a question the policy did not choose"
    if whole and text[-1] not in ".!":
        return "incomplete sentence"
    if re.search(r"\d", text):
        return "states a number"
    if re.search(r"https?://|www\.|@", text):
        return "contains a link or address"
    lower = text.lower()
    word_set = set(words)

    def found(lexicon: set[str]) -> set[str]:  # a phrase is matched in the text, a word among the words
        return {w for w in lexicon if (w in word_set if " " not in w else w in lower)}

    done = [decision.action] if confirmed is None else confirmed
    allowed_claims = set().union(*(ALLOWED_CLAIMS.get(a, set()) for a in done))
    for claim, lexicon in ACTION_CLAIMS.items():
        hits = set() if claim in allowed_claims else found(lexicon)
        if hits:
            return f"claims an action that was not done ({claim}: {sorted(hits)[0]})"
    off = sorted(found(OFF_SCRIPT))
    if off:
        return f"off script ({off[0]})"
    grams = _ngrams(" ".join(words))
    for other in forbidden:
        if grams & _ngrams(other):
            return "repeats another intent's answer"
    if grounding is not None:
        allowed = {_stem(w) for w in COURTESY | set(_WORD.findall(grounding.lower()))}
        new = [w for w in words if _stem(w) not in allowed]
        if new:
            return f"adds content ({new[0]!r} is neither in the message nor in the decided reply)"
    return None


def check_opener(opener: str, decision: DecisionResult, forbidden: list[str], grounding: str | None = None,
                 confirmed: Sequence[str] | None = None) -> str | None:
    """Return why the model's opening sentence is unacceptable, or None if it may be sent.

    With `grounding` (the customer's message and the decided content), every word must come
    from it or from the courtesy vocabulary: an acknowledgement that introduces a new word
    is adding content the policy did not decide.
    """
    if not opener.strip():
        return "empty"
    return _judge(opener, _WORD.findall(opener.lower()), decision, forbidden, grounding, whole=True,
                  confirmed=confirmed)


def check_reply(reply: str, template: str, decision: DecisionResult, forbidden: list[str]) -> str | None:
    """Whole-reply check: the decided content is present, nothing forbidden is."""
    if template and " ".join(template.split()) not in " ".join(reply.split()):
        return "does not carry the decided content"
    if decision.kind == "ask" and decision.question and decision.question not in reply:
        return "does not ask the chosen question"
    rest = " ".join(reply.split()).replace(" ".join(template.split()), " ")
    grams = _ngrams(rest)
    for text in forbidden:
        if grams & _ngrams(text):
            return "contains another intent's answer"
    return None


def check_partial_opener(partial: str, decision: DecisionResult, forbidden: list[str], grounding: str | None = None,
                         complete: bool = False, confirmed: Sequence[str] | None = None) -> str | None:
    """The opener check on a prefix of the model's text, for streaming.

    Only what the rest of the text cannot undo is judged: a question mark, a number, a link, a claim,
    an off-script phrase, another intent's answer, an ungrounded word. The last word is judged only
    once it is complete (followed by a non-word character, or `complete`). Returns why, or None.
    """
    text = " ".join(partial.replace("\n", " ").split())
    if not text:
        return None
    words = _WORD.findall(text.lower())
    if words and not complete and re.search(r"[A-Za-z0-9']$", partial) is not None:
        words = words[:-1]  # still being generated
    return _judge(text, words, decision, forbidden, grounding, whole=False, confirmed=confirmed)


_FIRST_END = re.compile(r"[.!?]")


class OpenerStream:
    """Guards a streamed opener: feed it the model's text deltas, it says what may be sent.

    Text is released only after it passed `check_partial_opener`, so an offending delta never reaches
    the client; tokens already sent before a violation are withdrawn by the caller (a `replace` event).
    Stops at the end of the first sentence, as the non-streamed reply does.
    """

    def __init__(self, decision: DecisionResult, forbidden: list[str], grounding: str, prefix: str = "",
                 confirmed: Sequence[str] | None = None) -> None:
        self.decision, self.forbidden, self.grounding, self.confirmed = decision, forbidden, grounding, confirmed
        self.raw = ""
        self.sent = ""
        self.done = False
        self.violation: str | None = None
        self.prefix = prefix

    def feed(self, delta: str) -> str:
        """Returns the text that may be sent now ('' if none); sets `done` / `violation`."""
        if self.done:
            return ""
        self.raw += delta
        text = self.prefix + self.raw
        end = _FIRST_END.search(text, len(self.prefix))
        if end is not None:
            text, self.done = text[: end.end()], True
        why = check_partial_opener(text, self.decision, self.forbidden, self.grounding, complete=self.done,
                                   confirmed=self.confirmed)
        if why is not None:
            self.violation, self.done = why, True
            return ""
        # Release only judged text: a word still being generated waits until it is complete.
        ready = text if self.done else re.sub(r"[A-Za-z0-9']+$", "", text)
        if len(ready) <= len(self.sent):
            return ""
        out = ready[len(self.sent):]
        self.sent = ready
        return out
