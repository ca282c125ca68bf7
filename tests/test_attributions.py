"""Token attributions (actors/attributions.py): Integrated Gradients of the intent model's logit.

Checked against the models themselves as oracle: the explainer's forward pass gives the served model's logits,
and the attributions sum to the logit difference from the baseline (completeness), for both model kinds. Over
HTTP, ``POST /v1/explain`` answers the same numbers and names a bad field in a 422.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def linear(models_dir: Path):
    from coact.actors.intent_models import load_intent_model

    return load_intent_model(models_dir / "intent")


@pytest.fixture(scope="module")
def encoder():
    from coact.actors.models import TextEncoder

    return TextEncoder(device="cpu", max_length=64)


def _sequence_folder(root: Path, labels: list[str], out_of_scope: str, pooling: str) -> Path:
    """A ``sequence_classification`` folder from MiniLM's files with a seeded random head (no training: the
    attributions are a property of whatever network the folder holds)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from coact.actors.intent_models import CLASSIFIER_FILE
    from coact.actors.models import minilm_path

    folder = root / f"intent-{pooling}"
    torch.manual_seed(0)
    if pooling == "cls":
        net = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=len(labels))
        net.save_pretrained(str(folder))
    else:
        AutoModel.from_pretrained(str(minilm_path())).save_pretrained(str(folder))
        head = torch.nn.Linear(384, len(labels))
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / CLASSIFIER_FILE))
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(str(folder))
    meta = {"kind": "sequence_classification", "pooling": pooling, "normalize": True, "dropout": 0.1,
            "labels": labels, "out_of_scope_label": out_of_scope, "temperature": 1.7,
            "class_priors": {label: 1.0 / len(labels) for label in labels}, "version": f"test-{pooling}",
            "max_length": 32}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


MESSAGES = ["my card was stolen yesterday", "why was I charged a fee at the ATM?", "hello"]


@pytest.mark.parametrize("message", MESSAGES)
def test_linear_head_matches_served_model_and_is_complete(linear, encoder, message: str) -> None:
    from coact.actors.attributions import IntentExplainer

    explainer = IntentExplainer(linear, encoder=encoder.model, tokenizer=encoder.tokenizer)
    out = explainer.explain(message, steps=64)
    # the explained network is the served one: its logits are the classifier's on the encoder's embedding
    served = linear.logits(encoder.embed([message]))[0]
    probs = linear.predict_proba(encoder.embed([message]))[0]
    assert out["target"] == linear.labels[int(np.argmax(probs))]
    assert out["probability"] == pytest.approx(float(probs.max()), abs=1e-4)
    assert out["target_logit"] == pytest.approx(float(np.max(served)), abs=1e-3)
    # completeness: attributions sum to the logit's change from the baseline, up to Captum's delta
    total = sum(out["attributions"])
    assert total == pytest.approx(out["target_logit"] - out["baseline_logit"], abs=max(1e-3, abs(out["delta"]) * 2))
    assert abs(out["delta"]) < 0.05 * max(1.0, abs(out["target_logit"] - out["baseline_logit"]))
    assert len(out["tokens"]) == len(out["attributions"]) and out["tokens"][0] == "[CLS]"
    assert sum(out["word_attributions"]) == pytest.approx(total - out["attributions"][0] - out["attributions"][-1],
                                                          abs=1e-6)


def test_linear_head_names_the_words_that_carry_the_intent(linear, encoder) -> None:
    from coact.actors.attributions import IntentExplainer

    out = IntentExplainer(linear, encoder=encoder.model, tokenizer=encoder.tokenizer).explain(
        "my card was stolen", target="lost_or_stolen_card")
    scores = dict(zip(out["words"], out["word_attributions"], strict=True))
    # the content words carry the intent; the function words next to them do not
    assert max(scores, key=scores.get) in {"stolen", "card"}
    assert scores["stolen"] > scores["my"] and scores["stolen"] > scores["was"]


def test_explaining_another_target_and_more_steps_converge(linear, encoder) -> None:
    from coact.actors.attributions import IntentExplainer

    explainer = IntentExplainer(linear, encoder=encoder.model, tokenizer=encoder.tokenizer)
    coarse = explainer.explain("I lost my card", target="card_arrival", steps=8)
    fine = explainer.explain("I lost my card", target="card_arrival", steps=128)
    assert coarse["target"] == fine["target"] == "card_arrival"
    assert abs(fine["delta"]) <= abs(coarse["delta"]) + 1e-6
    np.testing.assert_allclose(fine["target_logit"], coarse["target_logit"], atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sequence_classifier_both_poolings(linear, tmp_path: Path, pooling: str) -> None:
    from coact.actors.attributions import IntentExplainer
    from coact.actors.intent_models import SequenceIntentClassifier

    folder = _sequence_folder(tmp_path, list(linear.labels), linear.out_of_scope_label, pooling)
    model = SequenceIntentClassifier(folder, device="cpu")
    message = "my transfer has not arrived"
    out = IntentExplainer(model).explain(message, steps=64)
    logits = model.logits_texts([message])[0]
    assert out["target"] == model.labels[int(np.argmax(logits))]
    assert out["target_logit"] == pytest.approx(float(logits.max()), abs=1e-4)
    probs = model.predict_proba_texts([message])[0]
    assert out["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
    total = sum(out["attributions"])
    assert total == pytest.approx(out["target_logit"] - out["baseline_logit"], abs=max(1e-3, abs(out["delta"]) * 2))


def test_quantized_sequence_classifier_is_explained_on_its_float_network(linear, tmp_path: Path) -> None:
    from coact.actors.attributions import IntentExplainer, is_quantized
    from coact.actors.intent_models import SequenceIntentClassifier

    folder = _sequence_folder(tmp_path, list(linear.labels), linear.out_of_scope_label, "mean")
    quantized = SequenceIntentClassifier(folder, device="cpu", quantize=True)
    explainer = IntentExplainer(quantized)
    assert is_quantized(quantized.net) and not is_quantized(explainer.net)
    float_logits = SequenceIntentClassifier(folder, device="cpu").logits_texts(["I lost my card"])[0]
    out = explainer.explain("I lost my card", steps=32)
    assert out["target_logit"] == pytest.approx(float(float_logits.max()), abs=1e-4)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"message": "   "}, "message"),
    ({"message": "hi", "target": "no_such_intent"}, "target"),
    ({"message": "hi", "steps": 2}, "steps"),
])
def test_bad_requests_name_the_field(linear, encoder, kwargs: dict, field: str) -> None:
    from coact.actors.attributions import ExplainError, IntentExplainer

    explainer = IntentExplainer(linear, encoder=encoder.model, tokenizer=encoder.tokenizer)
    with pytest.raises(ExplainError) as err:
        explainer.explain(**kwargs)
    assert err.value.field == field


# ---------------------------------------------------------------- over HTTP

@pytest.mark.serve
def test_explain_route(app_url: str, linear, encoder) -> None:
    r = httpx.post(f"{app_url}/v1/explain", json={"message": "my card was stolen", "steps": 32},
                   timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    probs = linear.predict_proba(encoder.embed(["my card was stolen"]))[0]
    assert body["target"] == linear.labels[int(np.argmax(probs))]
    assert sum(body["attributions"]) == pytest.approx(body["target_logit"] - body["baseline_logit"],
                                                      abs=max(1e-3, abs(body["delta"]) * 2))
    assert "stolen" in body["words"]


@pytest.mark.serve
@pytest.mark.parametrize(("payload", "field"), [
    ({"message": "hi", "target": "no_such_intent"}, "target"),
    ({"message": "hi", "steps": 1}, "steps"),
    ({"message": ""}, "message"),
    ({"text": "hi"}, "message"),
])
def test_explain_route_errors(app_url: str, payload: dict, field: str) -> None:
    r = httpx.post(f"{app_url}/v1/explain", json=payload, timeout=60)
    assert r.status_code == 422, r.text
    assert field in json.dumps(r.json())
