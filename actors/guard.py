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
# Words that claim an action, in any inflection (see `_root`). A claim is allowed only when one of its actions
# was confirmed; the claims no action allows are never made (this domain has no executor for them).
ACTION_CLAIMS: dict[str, set[str]] = {
    "freeze": {"freeze", "froze", "frozen", "block", "lock", "suspend"},
    "unfreeze": {"unfreeze", "unfroze", "unfrozen", "unblock", "unlock", "reactivate", "lift", "reinstate"},
    "escalate": {"agent", "human", "colleague", "transfer you", "connect", "specialist", "pass you", "hand over",
                 "handover", "hand-over", "representative", "advisor", "adviser", "escalate"},
    "refund": {"refund", "reimburse", "compensate", "compensation", "money back", "reverse", "reversal", "chargeback",
               "return", "put back"},
    "credit": {"credit", "deposit", "waive", "add", "top up"},
    "cancel": {"cancel", "close", "terminate", "void"},
    "transfer": {"transfer", "send", "sent", "wire", "pay", "paid"},
    "limit": {"limit", "raise", "increase", "upgrade", "extend"},
    "replace": {"replace", "replacement", "reissue", "issue"},
}
ALLOWED_CLAIMS = {"freeze_card": {"freeze"}, "escalate": {"escalate"}, "unfreeze_card": {"unfreeze"}}
# Words that say something was done, whoever did it: never in an acknowledgement (unless it is negated or
# the customer's own doing: "the payment you made hasn't gone through").
DONE_WORDS = {"done", "sorted", "completed", "processed", "approved", "resolved", "fixed", "handled", "cleared",
              "removed", "restored", "updated", "changed", "applied", "activated", "confirmed", "arranged", "booked",
              "scheduled", "issued", "added", "granted", "authorised", "authorized", "unblocked", "on its way",
              "on the way", "gone through", "went through", "taken care", "all set", "good to go", "works again",
              "working again", "back to normal", "eligible", "entitled", "owed", "covered"}
# What happens to a customer (not by us): a perfect passive of these is an acknowledgement, not a claim.
MISHAPS = {"stolen", "lost", "declined", "rejected", "charged", "delayed", "compromised", "hacked", "used", "taken",
           "refused", "cloned", "swallowed", "scammed", "affected", "missed", "waiting", "left"}
# The verbs (and adjectives) a first-person sentence may have: acknowledging, not acting. `PURE_ACK` may be in
# the past ("I've noted"); the others only promise attention ("let me look"), never report a result.
PURE_ACK = {"understand", "understood", "see", "seen", "saw", "hear", "heard", "know", "known", "appreciate",
            "note", "noted", "receive", "received", "got", "read", "sorry", "glad", "happy", "pleased", "delighted",
            "thank", "thanks", "here", "sure", "aware", "afraid", "grateful", "really", "so"}
ACK = PURE_ACK | {"help", "assist", "look", "check", "explain", "sort", "listen", "take a look", "go through",
                  "walk you", "guide"}
_ADJ_TO = {"sorry", "glad", "happy", "pleased", "delighted", "here", "able", "ready", "keen", "going"}
_FIRST_PERSON = {"i", "i'm", "i've", "i'll", "i'd", "we", "we're", "we've", "we'll", "we'd", "let's"}
_SKIP = {"am", "are", "is", "be", "been", "being", "have", "has", "had", "do", "does", "did", "will", "would",
         "can", "could", "shall", "should", "may", "might", "must", "really", "so", "very", "truly", "just",
         "also", "always", "absolutely", "certainly", "definitely", "more", "than", "all", "still", "now",
         "already", "personally", "gonna", "to", "going"}
_NEGATORS = {"not", "no", "never", "without", "won't", "wont", "can't", "cannot", "don't", "doesn't", "didn't",
             "isn't", "aren't", "wasn't", "weren't", "hasn't", "haven't", "hadn't", "shouldn't", "wouldn't",
             "couldn't", "needn't", "instead", "skip", "skipping", "avoid", "undo", "stop", "stopped", "rather",
             "unnecessary", "necessary", "needless", "nothing"}
_DETERMINERS = {"the", "a", "an", "your", "my", "our", "their", "his", "her", "its", "this", "that", "these",
                "those", "any", "about", "with", "for", "regarding", "on", "of", "by", "from", "in", "some"}
_CUSTOMER = {"you", "you've", "they", "they've", "someone", "somebody", "he", "she", "who"}
_WANTS = {"want", "wanted", "wanting", "like", "wish", "need", "needed", "trying", "tried", "try", "asked",
          "asking", "hoping", "how", "able", "unable"}
NUMBER_WORDS = {"zero", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
                "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand",
                "million", "billion", "dozen", "grand", "percent", "half"}
CURRENCY = {"pound", "pounds", "quid", "dollar", "dollars", "euro", "euros", "cent", "cents", "pence", "penny",
            "yen", "rupee", "rupees", "franc", "francs", "gbp", "usd", "eur", "bucks", "sterling"}
_CURRENCY_SIGNS = re.compile(r"[£$€¥₹%]")
# Pointing the customer somewhere: links, addresses, numbers to ring, things to click.
_LINK = re.compile(r"https?://|www\.|@|\b[a-z0-9-]+\.(?:[a-z]{2,}|[a-z]{2}\.[a-z]{2})\b")
LURES = {"click", "tap", "visit", "download", "install", "login", "log in", "sign in", "link", "url", "website",
         "site", "portal", "dial", "call us", "ring us", "text us", "call me", "email us", "message us",
         "contact us on", "reply with", "text stop", "scan"}
SECRETS = {"pin", "password", "passcode", "cvv", "cvc", "code", "otp", "card number", "account number", "sort code",
           "credentials", "security number", "security details", "login details", "memorable"}
_ASKS = {"tell", "share", "give", "send", "provide", "confirm", "enter", "type", "reply", "need", "what", "verify",
         "read", "say"}
_WH = {"why", "how", "what", "which", "where", "when", "whether"}
_NO_NEED = re.compile(r"\b(?:no|don't|doesn't|do not|does not|won't|not|never|isn't|needn't)\s+(?:\w+\s+)?"
                      r"(?:need|needed|necessary|reason|point)\b")
_ACK_ROOTS: set[str] = set()  # filled below, once _root is defined
_TYPOGRAPHY = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                             "\u2014": "-", "\u2026": "..."})
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
yet were isn't aren't wasn't haven't hasn't you'd like asked asking letting telling mentioning sharing
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


def _root(word: str) -> str:
    """A word's root for the claim lexicons: "cancelling"/"cancelled"/"cancels" all give "cancel"."""
    word = _stem(word)
    return word[:-1] if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiou" else word


_ACK_ROOTS.update(_root(w) for w in ACK if " " not in w)


@lru_cache(maxsize=1)
def _claim_roots() -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple((claim, tuple(_root(w) for w in _WORD.findall(entry)))
                 for claim, lexicon in ACTION_CLAIMS.items() for entry in lexicon)


def _participle(word: str) -> bool:
    return word.endswith(("ed", "en")) or word in {"sent", "paid", "done", "froze", "put", "set", "lost", "got"}


def _negations(words: list[str]) -> set[int]:
    # "no problem" / "no worries" are courtesy, not a negation.
    return {i for i, w in enumerate(words) if w in _NEGATORS
            and not (w == "no" and i + 1 < len(words) and words[i + 1] in {"problem", "worries", "worry"})}


def _acknowledging(words: list[str], i: int) -> bool:
    """The word at `i` is an acknowledgement's noun or the customer's own doing, not a claim of ours:
    after a determiner or preposition ("about your refund"), after the customer as subject ("the money you sent"),
    or what the customer wants to do ("you'd like to cancel")."""
    for k in range(i - 1, max(-1, i - 4), -1):
        if words[k] in _DETERMINERS:
            return True
        if words[k] in _SKIP or words[k] in _FIRST_PERSON or words[k] in _NEGATORS:
            break
    if i > 0 and words[i - 1] in _CUSTOMER:
        return True
    # "you'd like to cancel", not "no need to cancel"
    return (i > 1 and words[i - 1] == "to" and (words[i - 2] in _WANTS or (i > 2 and words[i - 3] in _WANTS))
            and any(w.startswith("you") for w in words[max(0, i - 5) : i - 1]))


def _claims(words: list[str], allowed: set[str]) -> str | None:
    """The structural checks: nothing said to be done, promised or committed to beyond what was decided.

    - a first-person sentence ("I'm/I will/we've/let me ...") may only acknowledge (understand, see, sorry, help,
      look...), unless its verb claims a confirmed action ("I will freeze it now" once the freeze is decided);
    - a claim word of an action not confirmed is allowed only as an acknowledgement's noun ("your refund"), the
      customer's own doing or wish, or negated in the past ("hasn't been refunded");
    - a confirmed action may not be negated ("no need to freeze", "I won't freeze");
    - no promise by anyone else ("it will", "you'll"), no "is now", no perfect passive of a result ("has been
      credited"), no word that says something was done ("sorted", "approved", "on its way").
    The customer's words never make a claim acceptable: the grounding check comes after these.
    """
    n = len(words)
    negated = _negations(words)
    roots = [_root(w) for w in words]
    for i in range(n):
        for claim, entry in _claim_roots():
            if tuple(roots[i : i + len(entry)]) != entry:
                continue
            if claim in allowed:
                near = {k for k in negated if i - 4 <= k < i or i < k <= i + len(entry) + 2}
                if near:
                    return f"negates the decided action ({claim}: {words[min(near)]} ... {words[i]})"
                continue
            if _acknowledging(words, i):
                continue
            if _participle(words[i]) and any(i - 3 <= k < i for k in negated):
                continue  # "your refund hasn't been credited": the customer's problem, not our claim
            return f"claims an action that was not done ({claim}: {words[i]})"
    text = " ".join(words)
    if _NO_NEED.search(text) and any(entry[0] in roots for _, entry in _claim_roots()):
        return "advises against an action (no need)"
    for phrase in DONE_WORDS:
        for m in re.finditer(rf"\b{re.escape(phrase)}\b", text):
            i = len(text[: m.start()].split())
            if i > 0 and words[i - 1] in _CUSTOMER or any(i - 3 <= k < i for k in negated):
                continue
            return f"says something was done ({phrase})"
    if re.search(r"\b(?:is|are|'s|'re|was|were|has|have|had|it's|that's)\s+now\b|\bnow\s+(?:is|are|been)\b", text):
        return "states a change the policy did not decide (now)"
    for m in re.finditer(r"\b(?:has|have|had|'s|'ve)\s+(?:now\s+|already\s+|just\s+)?been\s+(\w+)", text):
        if _participle(m.group(1)) and m.group(1) not in MISHAPS:
            return f"reports a result ({m.group(1)})"
    for i, w in enumerate(words):
        prev = words[i - 1] if i else ""
        if ((w in {"will", "shall", "gonna"} and prev not in {"i", "we"})
                or (w.endswith("'ll") and w not in {"i'll", "we'll"})
                or (w == "going" and prev not in {"i'm", "we're", "am"})):
            return f"promises something the policy did not decide ({w})"
    for j in range(n):
        if words[j] in {"i", "we"} and j and (words[j - 1] in _WH or (j > 1 and words[j - 2] in _DETERMINERS)):
            continue  # an embedded clause: "why we verify", "the currencies we support"
        if words[j] in _FIRST_PERSON:
            k = j + 1
        elif words[j] in {"let", "allow"} and j + 1 < n and words[j + 1] in {"me", "us"}:
            k = j + 2
        else:
            continue
        why = _commitment(words, j, k, allowed, past=words[j] in {"i've", "we've"})
        if why is not None:
            return why
    return None


def _commitment(words: list[str], j: int, k: int, allowed: set[str], past: bool) -> str | None:
    """What follows a first-person subject at `j`, its verb from `k` on (auxiliaries and adverbs skipped)."""
    neg = False
    while k < len(words) and (words[k] in _SKIP or words[k] in _NEGATORS):
        neg = neg or words[k] in _NEGATORS
        past = past or words[k] in {"have", "has", "had", "did"}
        k += 1
    if k >= len(words):
        return None  # the verb is not generated yet (a streamed prefix) or there is none
    head = words[k]
    if head in PURE_ACK or (not past and _root(head) in _ACK_ROOTS) or (head == "take" and words[k + 1:k + 3] == ["a", "look"]):
        if head in _ADJ_TO and k + 1 < len(words) and words[k + 1] == "to":
            return _commitment(words, j, k + 2, allowed, past=False)  # "I'm happy to <verb>"
        return None
    root = _root(head)
    for claim, entry in _claim_roots():
        if entry and entry[0] == root and tuple(_root(w) for w in words[k : k + len(entry)]) == entry:
            if claim in allowed:
                return f"negates the decided action ({claim}: {head})" if neg else None
            return f"claims an action that was not done ({claim}: {head})"
    return f"makes a commitment the policy did not decide ({words[j]} ... {head})"


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
    if _CURRENCY_SIGNS.search(text):
        return "states an amount"
    if re.search(r"[^\x20-\x7e]", text):  # homoglyphs, zero-width and full-width characters smuggle words past
        return "contains characters outside plain text"
    lower = text.lower()
    word_set = set(words)
    if re.search(r"\d", text) or word_set & NUMBER_WORDS:
        return "states a number"
    if word_set & CURRENCY:
        return "states an amount"
    if _LINK.search(lower):
        return "contains a link or address"

    def found(lexicon: set[str]) -> set[str]:  # a phrase is matched in the text, a word among the words
        return {w for w in lexicon if (w in word_set if " " not in w else w in lower)}

    lure = sorted(found(LURES))
    if lure:
        return f"points the customer somewhere ({lure[0]})"
    secret = sorted(found(SECRETS))
    if secret and (word_set & _ASKS or "please" in word_set):
        return f"asks for security details ({secret[0]})"
    done = [decision.action] if confirmed is None else confirmed
    why = _claims(words, set().union(*(ALLOWED_CLAIMS.get(a, set()) for a in done)))
    if why is not None:
        return why
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
    opener = opener.translate(_TYPOGRAPHY)
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
    text = " ".join(partial.translate(_TYPOGRAPHY).replace("\n", " ").split())
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
