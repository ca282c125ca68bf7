"""Intent models of both kinds behind one interface.

Two kinds of model folder predict the same label set (the 77 BANKING77 intents followed by the domain's
out-of-scope label), both temperature-calibrated on the same validation split:

- ``linear_head`` (``coact prepare``'s ``models/intent``; the default when ``meta.json`` has no ``kind`` or the
  older ``intent-linear-head``): a linear head on frozen MiniLM sentence embeddings. It needs the
  embeddings (``emb``), not the texts.
- ``sequence_classification`` (``cluster/jobs/train_intent.py``, e.g. ``models/intent-ft``): the whole MiniLM
  encoder fine-tuned with a classification head. It runs on the texts. ``meta.json`` ``pooling`` says which
  head: ``"cls"`` is a plain ``AutoModelForSequenceClassification`` folder (BERT pooler on [CLS]);
  ``"mean"`` is an ``AutoModel`` encoder folder plus ``classifier.safetensors`` (mean pooling, optionally
  L2-normalised, then a linear layer: the sentence-transformers pooling MiniLM was trained with).

Both offer ``predict_proba_texts(texts, emb) -> (n, C)`` calibrated probabilities; ``needs_texts`` /
``needs_embeddings`` tell a caller which argument matters (the other may be ``None``).

    model = load_intent_model("models/intent-ft")
    probs = model.predict_proba_texts(["I lost my card"], None)

Imports stay light: torch and transformers load only when a fine-tuned model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from coact.actors.models import IntentClassifier, IntentLabels, ModelsNotBuiltError, read_meta, softmax

LINEAR_HEAD = "linear_head"
SEQUENCE_CLASSIFICATION = "sequence_classification"
_LINEAR_ALIASES = {LINEAR_HEAD, "intent-linear-head", "linear-head"}
_SEQUENCE_ALIASES = {SEQUENCE_CLASSIFICATION, "sequence-classification"}
CLASSIFIER_FILE = "classifier.safetensors"


def model_kind(meta: dict[str, Any]) -> str:
    """``linear_head`` or ``sequence_classification`` for a folder's meta.json (absent kind: linear head)."""
    kind = meta.get("kind") or LINEAR_HEAD
    if kind in _LINEAR_ALIASES:
        return LINEAR_HEAD
    if kind in _SEQUENCE_ALIASES:
        return SEQUENCE_CLASSIFICATION
    raise ValueError(f"unknown intent model kind {kind!r}; expected {LINEAR_HEAD!r} or {SEQUENCE_CLASSIFICATION!r}")


class LinearIntentModel(IntentClassifier):
    """``actors.models.IntentClassifier`` (linear head on embeddings) with the uniform text interface."""

    kind = LINEAR_HEAD
    needs_texts = False
    needs_embeddings = True

    def predict_proba_texts(self, texts: list[str] | None, emb: np.ndarray) -> np.ndarray:
        """(n, C) calibrated probabilities from the sentence embeddings ``emb`` (``texts`` are not used)."""
        if emb is None:
            raise ValueError("a linear-head intent model needs the sentence embeddings (emb)")
        return self.predict_proba(emb)


_MeanPoolingClassifier = None


def mean_pooling_classifier_class():
    """The ``nn.Module`` class of the mean-pooling head (built lazily so importing this module stays light)."""
    global _MeanPoolingClassifier
    if _MeanPoolingClassifier is not None:
        return _MeanPoolingClassifier
    import torch
    from torch import nn

    class MeanPoolingClassifier(nn.Module):
        """encoder -> masked mean over tokens -> (L2-normalise) -> dropout -> linear."""

        def __init__(self, encoder: nn.Module, num_labels: int, normalize: bool = True,
                     dropout: float = 0.1) -> None:
            super().__init__()
            self.encoder = encoder
            self.normalize = bool(normalize)
            self.dropout = nn.Dropout(dropout)
            self.classifier = nn.Linear(int(encoder.config.hidden_size), int(num_labels))

        def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1) if self.normalize else pooled

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
            return self.classifier(self.dropout(self.pool(input_ids, attention_mask, **kw)))

    _MeanPoolingClassifier = MeanPoolingClassifier
    return MeanPoolingClassifier


def wrap_sequence_classifier(hf_model):
    """Wrap an ``AutoModelForSequenceClassification`` so that forward returns the logits tensor (``.inner``
    is the transformers model, for ``save_pretrained``)."""
    import torch

    class SequenceClassifierLogits(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kw).logits

    return SequenceClassifierLogits(hf_model)


def build_network(folder: str | Path, meta: dict[str, Any]):
    """The torch module of a ``sequence_classification`` folder; called with ``input_ids`` and
    ``attention_mask`` it returns raw logits (a tensor) in ``meta['labels']`` order."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    folder = Path(folder)
    pooling = meta.get("pooling", "cls")
    if pooling == "cls":
        return wrap_sequence_classifier(
            AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32))
    if pooling == "mean":
        from safetensors.torch import load_file

        head_path = folder / CLASSIFIER_FILE
        if not head_path.is_file():
            raise ModelsNotBuiltError(f"{head_path} not found: the folder is incomplete (re-run train_intent)")
        encoder = AutoModel.from_pretrained(str(folder), dtype=torch.float32)
        cls = mean_pooling_classifier_class()
        net = cls(encoder, len(meta["labels"]), normalize=bool(meta.get("normalize", True)),
                  dropout=float(meta.get("dropout", 0.1)))
        net.classifier.load_state_dict(load_file(str(head_path)))
        return net
    raise ValueError(f"{folder}: unknown pooling {pooling!r} (expected 'cls' or 'mean')")


class SequenceIntentClassifier(IntentLabels):
    """A fine-tuned MiniLM intent classifier folder (``kind: sequence_classification``).

    Same attributes as ``IntentClassifier`` (``labels``, ``out_of_scope_label``, ``priors``, ``temperature``,
    ``version``, ``encoder_max_length``, ``in_scope_labels``, ``out_of_scope_index``). ``quantize=True``
    applies torch dynamic int8 to the Linear layers on CPU: 2x faster, but unlike the frozen encoder the
    fine-tuned one is sensitive to it (the argmax changed on 7 of 300 BANKING77 test queries), so it is off
    by default.
    """

    kind = SEQUENCE_CLASSIFICATION
    needs_texts = True
    needs_embeddings = False

    def __init__(self, path: str | Path, device: str | None = None, batch_size: int = 32,
                 quantize: bool = False, max_length: int | None = None) -> None:
        import torch
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.meta = read_meta(self.path)
        if model_kind(self.meta) != SEQUENCE_CLASSIFICATION:
            raise ValueError(f"{self.path} is a {self.meta.get('kind')!r} folder, not {SEQUENCE_CLASSIFICATION!r}")
        self.labels: list[str] = list(self.meta["labels"])
        self.out_of_scope_label: str = self.meta["out_of_scope_label"]
        self.temperature = float(self.meta["temperature"])
        self.priors = np.asarray([self.meta["class_priors"][label] for label in self.labels], dtype=np.float32)
        self.version: str = self.meta["version"]
        self.encoder_max_length = int(max_length or self.meta.get("max_length", 64))
        self.batch_size = int(batch_size)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        net = build_network(self.path, self.meta)
        net.eval()
        self.quantized = bool(quantize and self.device == "cpu")
        if self.quantized:
            net = torch.ao.quantization.quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8)
        self.net = net.to(self.device)

    def logits_texts(self, texts: list[str], progress: bool | str = False) -> np.ndarray:
        """(n, C) raw (uncalibrated) logits; texts are batched by length."""
        import torch

        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        starts = range(0, len(texts), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=progress if isinstance(progress, str) else "classify", unit="batch",
                          leave=False)
        with torch.inference_mode():
            for s in starts:
                idx = order[s:s + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.encoder_max_length, return_tensors="pt").to(self.device)
                logits = self.net(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                out[idx] = logits.float().cpu().numpy()
        return out

    def predict_proba_texts(self, texts: list[str], emb: np.ndarray | None = None,
                            progress: bool | str = False) -> np.ndarray:
        """(n, C) calibrated probabilities over ``labels`` (``emb`` is not used)."""
        if texts is None:
            raise ValueError("a fine-tuned intent model needs the texts")
        return softmax(self.logits_texts(list(texts), progress=progress).astype(np.float64)
                        / self.temperature).astype(np.float32)


def load_intent_model(path: str | Path, **kwargs: Any) -> LinearIntentModel | SequenceIntentClassifier:
    """Load an intent model folder of either kind (``meta.json`` ``kind``; absent means linear head).

    ``kwargs`` (device, batch_size, quantize, max_length) apply to fine-tuned models only.
    """
    meta = read_meta(path)
    if model_kind(meta) == LINEAR_HEAD:
        return LinearIntentModel(path)
    return SequenceIntentClassifier(path, **kwargs)
