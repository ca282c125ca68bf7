"""Reply phrasing: the prompt, the guarded composition and streaming shared by every backend, the
`ResponderBackend` protocol and its transformers implementation (plain code, no Ray)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from coact.actors.guard import COURTESY, OpenerStream, check_opener, check_reply, first_sentence
from coact.actors.models import load_lm
from coact.graphs.policy.domain import DomainPack
from coact.graphs.policy.messages import ResponderChunk, ResponderRequest, ResponderResult

STOP_STRINGS = [".", "!", "?"]  # only the first sentence is used
STREAM_THREAD = "coact-stream"

ACTION_PHRASES = {
    "answer": "explain how this works",
    "ask": "ask one clarifying question",
    "action": "take care of it now",
    "escalate": "hand over to a human colleague",
    "decline": "explain that this is outside what we can help with",
    "chitchat": "reply politely",
}


@dataclass
class GenerationSettings:
    max_new_tokens: int = 24
    repetition_penalty: float = 1.15
    timeout_s: float = 20.0


HISTORY_MESSAGES = 3  # earlier customer messages shown to the LM: what "yes" or "and the limit?" refers to


def earlier_messages(req: ResponderRequest) -> list[str]:
    return [t.text for t in req.history if t.role == "user"][-HISTORY_MESSAGES:]


def build_prompt(tokenizer, pack: DomainPack, req: ResponderRequest) -> str:
    kind = req.decision.kind
    message = req.message[:500]
    earlier = earlier_messages(req)
    if earlier:  # the acknowledgement names the problem, which a short follow-up does not repeat
        message = " / ".join([*(m[:200] for m in earlier), message])
    user = pack.prompts.opener.format(message=message, action=ACTION_PHRASES.get(kind, "reply"))
    messages = [{"role": "system", "content": pack.prompts.system}]
    for ex in pack.prompts.examples:
        messages.append({"role": "user", "content": pack.prompts.opener.format(message=ex.customer, action="reply")})
        messages.append({"role": "assistant", "content": ex.reply})
    messages.append({"role": "user", "content": user})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + pack.prompts.reply_prefix


def grounding(req: ResponderRequest) -> str:
    """The words an acknowledgement may use beyond the courtesy vocabulary: the customer's, and the content's."""
    return " ".join([*earlier_messages(req), req.message, req.template])


_WORD = re.compile(r"[a-z']+")
# Function words that name nothing; with the guard's courtesy words they make a sentence generic.
_FUNCTION = set("is are was were be been it its my me mine i you your our not no yes just still".split())


def names_problem(sentence: str, req: ResponderRequest) -> bool:
    """An acknowledgement earns its place only by naming what the customer said (a word of theirs that is
    not courtesy): "I'm here to assist you in any way possible!" names nothing and is not sent."""
    said = {w for m in [*earlier_messages(req), req.message] for w in _WORD.findall(m.lower())}
    said -= COURTESY | _FUNCTION
    return any(w in said for w in _WORD.findall(sentence.lower()))


def join_reply(req: ResponderRequest, sentence: str, layout: str) -> str:
    return f"{req.template} {sentence}" if layout == "content_first" else f"{sentence} {req.template}"


@torch.inference_mode()
def generate_batch(tokenizer, model, prompts: list[str], settings: GenerationSettings) -> list[tuple[str, int]]:
    """Greedy decoding of a left-padded batch; returns (text, new token count) per prompt."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **enc,
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        repetition_penalty=settings.repetition_penalty,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_time=settings.timeout_s,  # stop decoding rather than hold the batch past the deadline
        stop_strings=STOP_STRINGS,
        tokenizer=tokenizer,
    )
    new = out[:, enc["input_ids"].shape[1] :]
    results = []
    for row in new:
        ids = [t for t in row.tolist() if t != tokenizer.pad_token_id]
        results.append((tokenizer.decode(ids, skip_special_tokens=True), len(ids)))
    return results


def compose(req: ResponderRequest, generated: str, tokens: int, model_version: str, prefix: str = "",
            layout: str = "content_first") -> ResponderResult:
    """The LM's sentence + the decided content verbatim (order by `layout`); the guard decides which is sent."""
    template = req.template
    generated = prefix + generated
    sentence = first_sentence(generated)
    why = check_opener(sentence, req.decision, req.forbidden, grounding=grounding(req), confirmed=req.confirmed)
    if why is None:
        reply = join_reply(req, sentence, layout).strip()
        why = check_reply(reply, template, req.decision, req.forbidden)
        if why is None and not names_problem(sentence, req):
            why = "generic (names nothing the customer said)"
        if why is None and req.reason and req.reason not in reply:
            why = "does not carry the reason"
        if why is None:
            return ResponderResult(reply=reply, source="model", generated=generated, tokens=tokens,
                                   model_version=model_version)
    return ResponderResult(reply=template, source="template", guard=why, generated=generated, tokens=tokens,
                           model_version=model_version)


def template_result(req: ResponderRequest, why: str, model_version: str) -> ResponderResult:
    return ResponderResult(reply=req.template, source="template", guard=why, model_version=model_version)


# --- streaming ------------------------------------------------------------------------------------
# A backend streams (text delta, new token count) pairs; closing the iterator must stop generation.
Deltas = AsyncIterator[tuple[str, int]]


class _QueueStreamer:
    """transformers streamer (put/end protocol) that hands each new token id to an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, cancel: threading.Event) -> None:
        self.loop, self.queue, self.cancel, self.prompt_seen = loop, queue, cancel, False

    def _post(self, item) -> None:
        if self.cancel.is_set():  # nobody is listening any more (and the loop may be gone)
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # event loop closed
            self.cancel.set()

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt ids
            self.prompt_seen = True
            return
        self._post(value.reshape(-1).tolist())

    def end(self) -> None:
        self._post(None)


class _StopOnEvent:
    """Stopping criterion: the consumer went away (client disconnected, guard tripped, deadline)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


async def stream_transformers(tokenizer, model, prompt: str, settings: GenerationSettings,
                              max_new_tokens: int | None = None, stop: bool = True, min_new_tokens: int = 0) -> Deltas:
    """One request, greedy, same settings as `generate_batch`, decoded token by token in a thread."""
    from transformers import StoppingCriteriaList

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    kwargs = dict(max_new_tokens=max_new_tokens or settings.max_new_tokens, do_sample=False,
                  repetition_penalty=settings.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
                  max_time=settings.timeout_s, streamer=_QueueStreamer(loop, queue, cancel),
                  stopping_criteria=StoppingCriteriaList([_StopOnEvent(cancel)]))
    if stop:
        kwargs.update(eos_token_id=tokenizer.eos_token_id, stop_strings=STOP_STRINGS, tokenizer=tokenizer)
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(**enc, **kwargs)
        except BaseException as e:  # surfaced to the consumer, not lost in the thread
            kwargs["streamer"]._post(e)

    thread = threading.Thread(target=run, name=STREAM_THREAD, daemon=True)
    thread.start()
    ids: list[int] = []
    text = ""
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            ids.extend(t for t in item if t != tokenizer.pad_token_id)
            new = tokenizer.decode(ids, skip_special_tokens=True)
            if new.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
                continue
            delta, text = new[len(text):], new
            yield delta, len(item)
    finally:
        cancel.set()  # stops generate() at its next step when the consumer leaves early


class ResponderBackend(Protocol):
    """A language-model runtime behind the Responder (transformers here, vLLM in actors/vllm_backend.py).

    Built by `from_config(lm_folder, cfg)` (cfg: `actors.config.ResponderConfig`). Both render prompts with
    `tokenizer` and decode greedily with the same settings, so they phrase the same decision alike.
    """

    tokenizer: Any
    version_suffix: str  # appended to the LM folder's version in traces
    # True: whole replies come from `generate` on a batch (@serve.batch groups the requests); False: the
    # runtime batches continuously on its own, and a whole reply is its guarded stream, collected.
    batched: bool

    def generate(self, prompts: list[str], settings: GenerationSettings) -> list[tuple[str, int]]:
        """(text, new token count) per prompt, blocking; called only when `batched`."""
        ...

    def stream(self, prompt: str, settings: GenerationSettings, max_new_tokens: int | None = None,
               stop: bool = True, min_new_tokens: int = 0) -> Deltas:
        """(text delta, token count) pairs; closing the iterator stops generation."""
        ...

    def unfinished_requests(self) -> int: ...

    def shutdown(self) -> None: ...


class TransformersBackend:
    """Batched greedy decoding in this process; one thread per streamed reply."""

    version_suffix = ""
    batched = True

    def __init__(self, lm_folder: str) -> None:
        self.tokenizer, self.model = load_lm(lm_folder)

    @classmethod
    def from_config(cls, lm_folder: str, cfg: Any) -> TransformersBackend:
        return cls(lm_folder)

    def generate(self, prompts: list[str], settings: GenerationSettings) -> list[tuple[str, int]]:
        return generate_batch(self.tokenizer, self.model, prompts, settings)

    def stream(self, prompt: str, settings: GenerationSettings, max_new_tokens: int | None = None,
               stop: bool = True, min_new_tokens: int = 0) -> Deltas:
        return stream_transformers(self.tokenizer, self.model, prompt, settings, max_new_tokens, stop, min_new_tokens)

    def unfinished_requests(self) -> int:
        return sum(t.name == STREAM_THREAD for t in threading.enumerate())  # one generation thread per stream

    def shutdown(self) -> None:
        pass  # nothing outside this process


async def stream_reply(req: ResponderRequest, deltas: Deltas, model_version: str, prefix: str = "",
                       timeout_s: float = 20.0, layout: str = "content_first") -> AsyncIterator[ResponderChunk]:
    """Guarded streaming of one reply, for any backend.

    content_first: the decided content is sent at once (it is decided, nothing can withdraw it); the LM's
    sentence follows in one `token` chunk, only once it is whole and the guard passed it. Never a `replace`.
    opener_first: `token` chunks of opener text that passed the partial check, then the content, and a
    `replace` chunk (the template) when the guard rejects the text mid-stream or at the end.
    Last a `result` chunk with the same ResponderResult as a non-streamed call. Leaving early (cancellation)
    closes `deltas`, which stops generation.
    """
    early = layout == "content_first"
    if early:
        yield ResponderChunk(kind="token", text=req.template, final=True)
    guard = OpenerStream(req.decision, req.forbidden, grounding=grounding(req), prefix=prefix,
                         confirmed=req.confirmed)
    generated, tokens, why = "", 0, None
    deadline = time.monotonic() + timeout_s
    it = deltas.__aiter__()
    try:
        while not guard.done:
            try:
                text, n = await asyncio.wait_for(it.__anext__(), max(0.001, deadline - time.monotonic()))
            except StopAsyncIteration:
                break
            generated += text
            tokens += n
            out = guard.feed(text)
            if out and not early:
                yield ResponderChunk(kind="token", text=out)
    except TimeoutError:
        why = "generation timed out"
    finally:
        await it.aclose()
    if why is None and guard.violation is not None:
        why = f"stopped mid-stream: {guard.violation}"
    if why is None:
        result = compose(req, generated, tokens, model_version, prefix, layout)
    else:
        result = ResponderResult(reply=req.template, source="template", guard=why, generated=prefix + generated,
                                 tokens=tokens, model_version=model_version)
    sent = req.template if early else guard.sent
    if result.reply.startswith(sent):
        if result.reply[len(sent):]:  # the guard passed it: final (opener_first: what came before is too)
            yield ResponderChunk(kind="token", text=result.reply[len(sent):], final=True)
    else:  # opener_first only: rejected, or the accepted reply does not extend what was sent: send it whole
        yield ResponderChunk(kind="replace", text=result.reply, guard=result.guard)
    yield ResponderChunk(kind="result", result=result)


async def stream_raw(deltas: Deltas, model_version: str) -> AsyncIterator[ResponderChunk]:
    """Unguarded tokens, for benchmarks and cancellation tests through a handle; never sent to users."""
    generated, tokens = "", 0
    it = deltas.__aiter__()
    try:
        async for text, n in it:
            generated += text
            tokens += n
            yield ResponderChunk(kind="token", text=text)
    finally:
        await it.aclose()
    yield ResponderChunk(kind="result", result=ResponderResult(reply=generated, source="model", generated=generated,
                                                              tokens=tokens, model_version=model_version))
