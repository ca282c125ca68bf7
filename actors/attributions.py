"""Token attributions for the intent decision: Integrated Gradients over the word-embedding layer (Captum).

Both intent model kinds (``actors.intent_models``) become one differentiable ``(input_ids, attention_mask) ->
raw logits`` module:

- ``linear_head``: MiniLM encoder -> masked mean pooling -> L2-normalise -> the saved linear head (W, b from
  ``head.safetensors``, rebuilt as a torch ``Linear``), i.e. exactly ``IntentClassifier.logits`` on the
  ``TextEncoder`` embedding;
- ``sequence_classification``: the fine-tuned network itself (``build_network``; a float copy when the served
  one is int8-quantized, since dynamic-quantized layers have no gradients).

The attributed quantity is the target intent's *raw* logit (the calibrated one is it divided by the model's
temperature, so attributions scale by the same factor). The baseline keeps [CLS]/[SEP] and replaces every other
token by [PAD]: "the same sentence frame with no words". Completeness: the attributions sum to
``target_logit - baseline_logit`` up to ``delta`` (Captum's convergence delta, shrinking with ``steps``).

    explainer = IntentExplainer(classifier)           # once per model
    explainer.explain("my card was stolen")           # {"target": "lost_or_stolen_card", "tokens": [...], ...}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from coact.actors.intent_models import LINEAR_HEAD, build_network
from coact.actors.models import minilm_path, softmax

MIN_STEPS, MAX_STEPS, DEFAULT_STEPS = 8, 256, 50


class ExplainError(ValueError):
    """A bad explanation request; ``field`` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _input_embeddings(net: Any) -> Any:
    """The word-embedding ``nn.Embedding`` of the (first) transformers model inside ``net``."""
    for module in net.modules():
        get = getattr(module, "get_input_embeddings", None)
        if callable(get):
            return get()
    raise ValueError(f"no transformers model with input embeddings inside {type(net).__name__}")


def linear_head_network(classifier: Any, encoder: Any | None = None) -> Any:
    """encoder -> mean pooling -> normalise -> the classifier's linear head, as a torch module returning
    raw logits. ``encoder`` is a float transformers ``AutoModel`` (default: MiniLM from its package files)."""
    import torch
    from transformers import AutoModel

    from coact.actors.intent_models import mean_pooling_classifier_class

    if encoder is None:
        encoder = AutoModel.from_pretrained(str(minilm_path()), dtype=torch.float32)
    net = mean_pooling_classifier_class()(encoder, len(classifier.labels), normalize=True, dropout=0.0)
    with torch.no_grad():
        net.classifier.weight.copy_(torch.from_numpy(np.asarray(classifier.W, dtype=np.float32)))
        net.classifier.bias.copy_(torch.from_numpy(np.asarray(classifier.b, dtype=np.float32)))
    return net.eval()


def is_quantized(net: Any) -> bool:
    return any("quantized" in type(m).__module__ for m in net.modules())


class IntentExplainer:
    """Integrated Gradients of one intent model's logits with respect to its word embeddings.

    ``encoder`` (linear head only): a float MiniLM ``AutoModel`` to reuse (e.g. the serving encoder when it
    is not quantized); ``tokenizer``: its tokenizer. Without them MiniLM is loaded from the package's files.
    """

    def __init__(self, classifier: Any, encoder: Any | None = None, tokenizer: Any | None = None,
                 device: str = "cpu") -> None:
        import torch
        from transformers import AutoTokenizer

        self.classifier = classifier
        self.labels: list[str] = list(classifier.labels)
        self.temperature = float(classifier.temperature)
        self.max_length = int(getattr(classifier, "encoder_max_length", 64))
        self.model_name = f"{classifier.kind}/{classifier.version}"
        self.device = device
        if classifier.kind == LINEAR_HEAD:
            if encoder is not None and is_quantized(encoder):
                encoder = None
            self.net = linear_head_network(classifier, encoder)
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(minilm_path()))
        else:
            net = classifier.net
            if is_quantized(net):
                net = build_network(Path(classifier.path), classifier.meta)
            self.net = net
            self.tokenizer = classifier.tokenizer
        self.net = self.net.eval().to(device)
        self.embeddings = _input_embeddings(self.net)
        self._torch = torch

    def _logits(self, input_ids: Any, attention_mask: Any) -> Any:
        return self.net(input_ids=input_ids, attention_mask=attention_mask)

    def explain(self, message: str, target: str | None = None, steps: int = DEFAULT_STEPS) -> dict[str, Any]:
        """Token attributions for ``target`` (default: the top intent) on ``message``; see the module doc."""
        from captum.attr import LayerIntegratedGradients

        torch = self._torch
        if not isinstance(message, str) or not message.strip():
            raise ExplainError("message", "message is empty")
        if target is not None and target not in self.labels:
            raise ExplainError("target", f"unknown intent label {target!r} for model {self.model_name}")
        if not MIN_STEPS <= int(steps) <= MAX_STEPS:
            raise ExplainError("steps", f"steps must be between {MIN_STEPS} and {MAX_STEPS}")
        enc = self.tokenizer([message], truncation=True, max_length=self.max_length, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        special = torch.tensor(self.tokenizer.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True),
                               dtype=torch.bool, device=self.device)
        baseline = torch.where(special, ids[0], torch.full_like(ids[0], self.tokenizer.pad_token_id))[None]
        with torch.no_grad():
            logits = self._logits(ids, mask)[0].double().cpu().numpy()
            base_logits = self._logits(baseline, mask)[0].double().cpu().numpy()
        probs = softmax(logits[None] / self.temperature)[0]
        index = int(np.argmax(probs)) if target is None else self.labels.index(target)
        lig = LayerIntegratedGradients(self._logits, self.embeddings)
        attr, delta = lig.attribute(ids, baselines=baseline, additional_forward_args=(mask,), target=index,
                                    n_steps=int(steps), method="gausslegendre", return_convergence_delta=True)
        scores = attr.sum(dim=-1)[0].detach().double().cpu().numpy()
        tokens = self.tokenizer.convert_ids_to_tokens(ids[0].tolist())
        words, word_scores = merge_word_pieces(tokens, scores.tolist(), special.tolist())
        return {
            "model": self.model_name,
            "target": self.labels[index],
            "probability": float(probs[index]),
            "tokens": tokens,
            "attributions": [float(s) for s in scores],
            "words": words,
            "word_attributions": word_scores,
            "delta": float(delta.detach().reshape(-1)[0]),
            "target_logit": float(logits[index]),
            "baseline_logit": float(base_logits[index]),
        }


def merge_word_pieces(tokens: list[str], scores: list[float], special: list[bool | int]) -> tuple[list[str], list[float]]:
    """Words from WordPiece tokens ("##" continues the previous word), each with the sum of its pieces'
    attributions; special tokens are left out."""
    words: list[str] = []
    sums: list[float] = []
    for tok, score, is_special in zip(tokens, scores, special, strict=True):
        if is_special:
            continue
        if tok.startswith("##") and words:
            words[-1] += tok[2:]
            sums[-1] += float(score)
        else:
            words.append(tok)
            sums.append(float(score))
    return words, sums
