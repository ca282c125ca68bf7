"""The guard on a streamed reply, without Ray: pieces released only once checked, and a violation stops
generation and replaces the text (the same over HTTP: tests/test_streaming.py)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def _decision(action: str = "answer:card_arrival", kind: str = "answer"):
    from coact.graphs.policy.messages import DecisionResult

    return DecisionResult(action=action, kind=kind, target="card_arrival", expected_utility={},
                          value_of_information={}, posterior={}, explanation=[], reason="test", domain_version="t")


def _feed(pieces: list[str], message: str = "my card has not arrived", template: str = "Cards arrive in days.",
          prefix: str = "I'm"):
    from coact.actors.guard import OpenerStream

    guard = OpenerStream(_decision(), [], grounding=f"{message} {template}", prefix=prefix)
    sent = [guard.feed("")]
    for p in pieces:
        sent.append(guard.feed(p))
    return guard, "".join(sent)


def test_opener_stream_releases_checked_text_and_stops_at_the_sentence_end() -> None:
    guard, sent = _feed([" sorry", " your", " card", " has", " not", " arrived", ".", " More", " text"])
    assert guard.violation is None and guard.done
    assert sent == "I'm sorry your card has not arrived."


def test_opener_stream_withholds_the_offending_piece() -> None:
    guard, sent = _feed([" sorry", ",", " we", " will", " refund", " you"])
    assert guard.violation and "refund" in guard.violation
    assert "refund" not in sent and sent.startswith("I'm sorry")
    guard, sent = _feed([" sorry", " about", " the", " 3"])
    assert guard.violation == "states a number" and "3" not in sent


def test_opener_stream_judges_a_word_only_once_complete() -> None:
    from coact.actors.guard import check_partial_opener

    d = _decision()
    # "arr" could still become "arrived" (grounded): not judged yet; "arrzz " is complete and ungrounded.
    assert check_partial_opener("I'm sorry it has not arr", d, [], grounding="my card has not arrived") is None
    assert "adds content" in check_partial_opener("I'm sorry it has not arrzz ", d, [], grounding="my card")


@pytest.mark.parametrize("layout", ["opener_first", "content_first"])
def test_stream_reply_stops_generation_on_a_violation(layout: str) -> None:
    import asyncio

    from coact.actors.generation import stream_reply
    from coact.graphs.policy.messages import ResponderRequest

    closed = []

    async def deltas():
        try:
            for piece in [" sorry", ",", " we", " will", " refund", " you", " now", "."]:
                yield piece, 1
        finally:
            closed.append(True)  # generation is stopped when the guard trips

    req = ResponderRequest(message="my card has not arrived", decision=_decision(), template="Cards arrive in days.")

    async def collect():
        return [c async for c in stream_reply(req, deltas(), "v", prefix="I'm", layout=layout)]

    chunks = asyncio.run(collect())
    kinds = [c.kind for c in chunks]
    result = chunks[-1].result
    assert closed == [True] and result.source == "template" and result.reply == req.template
    assert result.guard.startswith("stopped mid-stream")
    assert "refund" not in "".join(c.text for c in chunks if c.kind == "token")
    if layout == "opener_first":  # opener text was shown, then withdrawn
        assert kinds[-2:] == ["replace", "result"] and chunks[-2].text == req.template
    else:  # the decided content went first, and nothing shown is taken back
        assert kinds == ["token", "result"] and chunks[0].text == req.template


def test_content_first_sends_the_content_at_once_and_a_passed_sentence_whole() -> None:
    import asyncio

    from coact.actors.generation import stream_reply
    from coact.graphs.policy.messages import ResponderRequest

    seen: list[str] = []

    async def deltas():
        for piece in [" sorry", " your", " card", " has", " not", " arrived", "."]:
            seen.append(piece)
            yield piece, 1

    req = ResponderRequest(message="my card has not arrived", decision=_decision(), template="Cards arrive in days.")

    async def collect():
        out = []
        async for c in stream_reply(req, deltas(), "v", prefix="I'm", layout="content_first"):
            out.append((c, len(seen)))
        return out

    chunks = asyncio.run(collect())
    assert chunks[0][0].text == req.template and chunks[0][1] == 0  # before the model produced anything
    assert [c.kind for c, _ in chunks] == ["token", "token", "result"]
    assert chunks[1][0].text == " I'm sorry your card has not arrived." and chunks[1][1] == len(seen)
    assert chunks[-1][0].result.reply == "Cards arrive in days. I'm sorry your card has not arrived."


def test_named_events_carry_the_server_time_and_openai_chunks_none() -> None:
    import time

    from coact.graphs.serving.streaming import sse

    before = time.time()
    event = sse("token", {"text": "hi"}).decode()
    after = time.time()
    name, ident, data = event.split("\n")[:3]
    assert name == "event: token" and data == 'data: {"text":"hi"}' and event.endswith("\n\n")
    assert ident.startswith("id: ") and before - 1e-6 <= float(ident[4:]) <= after + 1e-6  # µs precision
    assert sse(None, {"x": 1}).decode() == 'data: {"x":1}\n\n'  # OpenAI's chunks: data lines only
