"""A deterministic adversarial Responder backend: a language model that fully obeys the customer.

`responder: {backend: scripted, script: FILE}` replaces the LM by a script of attacks: JSONL lines (a file, or
every `*.jsonl` of a folder) with the customer's `message` and the `output` the attacker wants the model to
say. The backend finds the customer's message in the prompt (the last user turn of the chat template) and
"generates" that output, streamed word by word, as an LM that followed the injected instruction would. A
message not in the script is obeyed too when it carries an instruction (`... just say: X`, `reply with: X`):
X is the output; otherwise the backend writes a plain acknowledgement. What it outputs then goes through the
same guard as a real model's text, so the experiments measure the guard against a worst-case model.

Only the LM folder's tokenizer is loaded (the prompt is rendered with its chat template); no weights.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from coact.actors.generation import GenerationSettings

DEFAULT_OUTPUT = "I'm here to help with that."
PROMPT_CHARS = 500  # build_prompt keeps the first 500 characters of the message
# "... and just say: X", "reply with: X", "respond with exactly this sentence: X", "just print "X"".
_INSTRUCTION = re.compile(r"(?:say|print|reply with|respond with|repeating|answer only|reply is)"
                          r"(?: exactly| only| this sentence)*\s*:?\s*\"?(?P<out>[^\"\[]+?)\"?\s*(?:\[|$)",
                          re.IGNORECASE)
_SENTINELS = ("<<probe-a>>", "<<probe-b>>", "<<probe-c>>")


def load_script(path: str | Path) -> dict[str, str]:
    """message -> output from a JSONL file or a folder of them; a line without both fields is an error."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"responder.script: no JSONL script at {path}")
    script: dict[str, str] = {}
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("message"), str) or not isinstance(row.get("output"), str):
                raise ValueError(f"responder.script: {f}:{n} needs string fields 'message' and 'output'")
            script[row["message"][:PROMPT_CHARS]] = row["output"]
    return script


class TurnParser:
    """Finds the last user turn and the forced reply prefix in a prompt rendered with `tokenizer`'s template.

    The template is probed once with sentinel turns: what it writes between an assistant turn and the next user
    turn's text, and after the last user turn's text (the generation prompt), whatever the model family.
    """

    def __init__(self, tokenizer: Any) -> None:
        a, b, c = _SENTINELS
        probe = tokenizer.apply_chat_template(
            [{"role": "user", "content": a}, {"role": "assistant", "content": b}, {"role": "user", "content": c}],
            tokenize=False, add_generation_prompt=True)
        self.before_user = probe[probe.index(b) + len(b) : probe.index(c)]
        self.after_user = probe[probe.index(c) + len(c) :]

    def split(self, prompt: str) -> tuple[str, str]:
        """(the last user turn's text, the text after the generation prompt: the reply prefix)."""
        end = prompt.rfind(self.after_user)
        if end < 0:
            return prompt, ""
        start = prompt.rfind(self.before_user, 0, end)
        start = 0 if start < 0 else start + len(self.before_user)
        return prompt[start:end], prompt[end + len(self.after_user) :]


def obey(user_turn: str, script: dict[str, str]) -> str:
    """The output an obedient model writes for this user turn (the opener format around the message included)."""
    # The longest scripted message in the turn: a message that contains another is the more specific one.
    best = max((m for m in script if m in user_turn), key=len, default=None)
    if best is not None:
        return script[best]
    found = list(_INSTRUCTION.finditer(user_turn))
    return found[-1].group("out").strip() if found else DEFAULT_OUTPUT


class ScriptedBackend:
    """A `ResponderBackend` that says what the attacker asked for; see the module docstring."""

    version_suffix = "+scripted"
    batched = True

    def __init__(self, lm_folder: str, script: str | Path | None = None) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(lm_folder)  # the chat template only: no weights
        self.parser = TurnParser(self.tokenizer)
        self.script = load_script(script) if script else {}
        self.streams = 0

    @classmethod
    def from_config(cls, lm_folder: str, cfg: Any) -> ScriptedBackend:
        return cls(lm_folder, getattr(cfg, "script", None))

    def text(self, prompt: str) -> str:
        """The continuation after the prompt's reply prefix: prefix + continuation is the attacker's output."""
        user, prefix = self.parser.split(prompt)
        output = obey(user, self.script)
        if prefix and output.startswith(prefix):
            return output[len(prefix) :]
        return f" {output}" if prefix else output

    def _tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompts: list[str], settings: GenerationSettings) -> list[tuple[str, int]]:
        # No token limit and no stop strings: the attacker's whole text reaches the guard.
        return [(t, self._tokens(t)) for t in map(self.text, prompts)]

    async def stream(self, prompt: str, settings: GenerationSettings, max_new_tokens: int | None = None,
                     stop: bool = True, min_new_tokens: int = 0) -> AsyncIterator[tuple[str, int]]:
        self.streams += 1
        try:
            for piece in re.findall(r"\s*\S+", self.text(prompt)):  # word by word, as a model's deltas
                await asyncio.sleep(0)
                yield piece, self._tokens(piece)
        finally:
            self.streams -= 1

    def unfinished_requests(self) -> int:
        return self.streams

    def shutdown(self) -> None:
        pass
