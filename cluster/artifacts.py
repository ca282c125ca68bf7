"""What ``coact prepare``, the jobs and the utterance bank write: content hashes and versions, JSON written
atomically, safetensors that round-trip, and the one cache of sentence embeddings.

The embedding cache lives in ``<models>/cache/emb-<name>-<key>.npy`` with ``key = content_hash(encoder
fingerprint, max length, texts)``: whoever embeds the same texts with the same encoder (``prepare``, a job,
the bank) finds the same file. A length other than ``MAX_LENGTH`` adds ``-L<n>`` to the name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

MAX_LENGTH = 64  # encoder max tokens for queries (BANKING77/CLINC texts are short)


# ---------------------------------------------------------------- hashes and versions

def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_hash(*parts: Any, n: int = 16) -> str:
    """The first ``n`` hex digits of a SHA-256 over the parts (bytes as they are, anything else as canonical JSON)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else canonical_json(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:n]


def content_version(files: list[Path], meta: dict[str, Any]) -> str:
    """A model folder's ``version``: its weight files' bytes and its meta (without ``version``)."""
    from coact.cluster.datasets import file_sha256

    h = hashlib.sha256()
    for f in files:
        h.update(file_sha256(f).encode())
    h.update(canonical_json({k: v for k, v in meta.items() if k != "version"}).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- files

def write_json(path: Path, obj: Any) -> None:
    """Indented JSON, written to a temporary sibling and renamed (readers never see half a file)."""
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_tensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """safetensors.numpy writes an array's raw buffer: make it C-contiguous first (sklearn's coef_ is
    Fortran-ordered, which would otherwise be saved transposed), then check the round trip."""
    from safetensors.numpy import load_file, save_file

    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    save_file(arrays, str(path))
    back = load_file(str(path))
    for k, v in arrays.items():
        if not np.array_equal(back[k], v):
            raise RuntimeError(f"{path}: tensor {k!r} did not round-trip")


# ---------------------------------------------------------------- the embedding cache

class EmbeddingCache:
    """Sentence embeddings of named text lists by one encoder folder, cached in ``folder``.

    ``threads`` (torch intra-op threads) is set when the encoder is loaded; None leaves the caller's setting.
    ``log`` gets a line when the encoder loads and for every list embedded afresh. ``prune``: writing a name
    removes its entries for other texts (``prepare``'s fixed lists); the jobs keep every sample they embed.
    """

    def __init__(self, folder: Path, encoder_path: str | Path | None = None, device: str | None = None,
                 threads: int | None = None, log: Callable[[str], None] | None = None, prune: bool = False) -> None:
        from coact.actors import models as M

        self.folder = Path(folder)
        self.encoder_path = Path(encoder_path) if encoder_path is not None else M.minilm_path()
        self.device, self.threads, self.log, self.prune = device, threads, log, prune
        self._fingerprint: str | None = None
        self._encoder: Any = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            from coact.actors.models import folder_fingerprint

            self._fingerprint = folder_fingerprint(self.encoder_path)
        return self._fingerprint

    def encoder(self) -> Any:
        """The ``actors.models.TextEncoder`` (loaded once)."""
        if self._encoder is None:
            from coact.actors.models import TextEncoder

            if self.threads is not None:
                import torch

                torch.set_num_threads(self.threads)
            if self.log:
                self.log(f"loading encoder {self.encoder_path}")
            self._encoder = TextEncoder(self.encoder_path, max_length=MAX_LENGTH, device=self.device)
        return self._encoder

    def path(self, name: str, texts: list[str], max_length: int = MAX_LENGTH) -> Path:
        key = content_hash(self.fingerprint, int(max_length), [str(t) for t in texts], n=12)
        stem = name if int(max_length) == MAX_LENGTH else f"{name}-L{int(max_length)}"
        return self.folder / f"emb-{stem}-{key}.npy"

    def embed(self, name: str, texts: list[str], max_length: int = MAX_LENGTH,
              log: Callable[[str], None] | None = None) -> np.ndarray:
        """(n, dim) embeddings of ``texts``: from the cache, or computed and cached under ``name`` (replacing
        that name's entries for other texts). A read-only folder only loses the cache. ``log`` overrides
        the cache's for this call."""
        from coact.actors.models import EMBED_DIM

        log = log or self.log

        texts = [str(t) for t in texts]
        path = self.path(name, texts, max_length)
        if path.is_file():
            emb = np.load(path)
            if emb.shape == (len(texts), EMBED_DIM):
                return emb
        if log:
            log(f"embedding {len(texts)} texts ({name}, max length {max_length}) -> {path}")
        emb = self.encoder().embed(texts, batch_size=32, max_length=int(max_length), progress=f"embed {name}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            # Same name, other texts or encoder (keys are of one length: "-L<n>" or longer names differ).
            for stale in self.folder.glob(f"{path.stem.rsplit('-', 1)[0]}-*.npy") if self.prune else ():
                if len(stale.name) == len(path.name):
                    stale.unlink(missing_ok=True)
            tmp = self.folder / f".{path.name}.{os.getpid()}.tmp.npy"
            np.save(tmp, emb)
            os.replace(tmp, path)
        except OSError:
            pass
        return emb


@cache
def embedding_cache(folder: Path, encoder_path: Path | None = None, device: str | None = None) -> EmbeddingCache:
    """One ``EmbeddingCache`` (and so one loaded encoder) per folder, encoder and device in this process."""
    return EmbeddingCache(folder, encoder_path, device)
