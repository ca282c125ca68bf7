"""Batched reply phrasing with a causal LM through transformers (plain functions, no Ray)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.guard import check_opener, check_reply, first_sentence
from actors.schemas import ResponderRequest, ResponderResult
from graphs.domain import DomainPack

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


def build_prompt(tokenizer, pack: DomainPack, req: ResponderRequest) -> str:
    kind = req.decision.kind
    user = pack.prompts.opener.format(message=req.message[:500], action=ACTION_PHRASES.get(kind, "reply"))
    messages = [{"role": "system", "content": pack.prompts.system}]
    for ex in pack.prompts.examples:
        messages.append({"role": "user", "content": pack.prompts.opener.format(message=ex.customer, action="reply")})
        messages.append({"role": "assistant", "content": ex.reply})
    messages.append({"role": "user", "content": user})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + pack.prompts.reply_prefix


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
        stop_strings=[".", "!", "?"],  # only the first sentence is used
        tokenizer=tokenizer,
    )
    new = out[:, enc["input_ids"].shape[1] :]
    results = []
    for row in new:
        ids = [t for t in row.tolist() if t != tokenizer.pad_token_id]
        results.append((tokenizer.decode(ids, skip_special_tokens=True), len(ids)))
    return results


def compose(req: ResponderRequest, generated: str, tokens: int, model_version: str, prefix: str = "") -> ResponderResult:
    """Opener from the model + the decided content verbatim; the guard decides which is sent."""
    template = req.template
    generated = prefix + generated
    opener = first_sentence(generated)
    why = check_opener(opener, req.decision, req.forbidden, grounding=f"{req.message} {template}")
    if why is None:
        reply = f"{opener} {template}".strip()
        why = check_reply(reply, template, req.decision, req.forbidden)
        if why is None:
            return ResponderResult(reply=reply, source="model", generated=generated, tokens=tokens,
                                   model_version=model_version)
    return ResponderResult(reply=template, source="template", guard=why, generated=generated, tokens=tokens,
                           model_version=model_version)


def template_result(req: ResponderRequest, why: str, model_version: str) -> ResponderResult:
    return ResponderResult(reply=req.template, source="template", guard=why, model_version=model_version)
