"""Conversation acts (the `acts` prepare part, actors/acts.py), the SGD loader and answers in words."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import get_args

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from coact.actors import acts as A  # noqa: E402
from coact.actors import models as M  # noqa: E402
from coact.actors.nlu import normalise, understand  # noqa: E402
from coact.cluster import datasets as D  # noqa: E402
from coact.cluster import prepare as P  # noqa: E402
from coact.graphs.policy.domain import DOMAINS_DIR, DomainPackError, load_pack, parse_pack  # noqa: E402
from coact.graphs.policy.messages import ActName, IntentRequest  # noqa: E402
from tests.helpers.data import data_root, require  # noqa: E402

pytestmark = pytest.mark.models

PACK = load_pack("banking")
BANKING = (DOMAINS_DIR / "banking.yaml").read_text()

# Floors set from what the build measured here (held-out macro-F1 over the acts 0.90-0.92 across the variants
# tried, the weakest act 0.85; answer reading 0.96 on 46 held-out answers), with room for a different machine's
# numerics, not tuned to pass.
MIN_MACRO_F1 = 0.85
MIN_ACT_F1 = 0.75
MIN_CONTENT_F1 = 0.9
MIN_ANSWER_ACCURACY = 0.85


@pytest.fixture(scope="module")
def encoder() -> M.TextEncoder:
    import torch

    torch.set_num_threads(2)
    return M.TextEncoder(max_length=64)


@pytest.fixture(scope="module")
def classifier(models_dir: Path) -> A.ActClassifier:
    return A.ActClassifier(A.acts_path(models_dir))


@pytest.fixture(scope="module")
def shared_data() -> None:
    require(data_root(), "the shared data folder")  # skipped when absent; a failure in CI (CI=true)


# ---------------------------------------------------------------- data


def test_sgd_loader_on_the_local_sample(shared_data: None) -> None:
    turns = D.load_sgd_user_turns()
    assert len(turns) == 1058
    assert len({t.dialogue_id for t in turns}) == 128
    assert all("Banks_1" in t.services for t in turns)
    first = turns[0]
    assert (first.dialogue_id, first.turn, first.system_acts, first.pending) == ("97_00000", 0, (), False)
    assert first.acts == ("INFORM", "INFORM_INTENT")
    assert all(t.turn % 2 == 0 and t.utterance for t in turns)  # user turns only, the even ones
    acts = {a for t in turns for a in t.acts}
    assert {"INFORM", "NEGATE", "THANK_YOU", "GOODBYE", "SELECT", "REQUEST_ALTS"} <= acts
    # A turn after the system asked (REQUEST) or offered something is pending; after "anything else?" it is not.
    assert any(t.pending and "REQUEST" in t.system_acts for t in turns)
    assert not any(t.pending for t in turns if t.system_acts == ("REQ_MORE",))
    assert D.fingerprint([D.SGD_SAMPLE])[D.SGD_SAMPLE]["sha256"] == D.SGD_FILES[D.SGD_SAMPLE].sha256
    again = D.load_sgd_user_turns()
    again.clear()
    assert len(D.load_sgd_user_turns()) == 1058


def test_sgd_loader_reads_coact_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / Path(D.SGD_SAMPLE).parent
    folder.mkdir(parents=True)
    dialogue = {"dialogue_id": "x_1", "services": ["Banks_1"], "turns": [
        {"speaker": "USER", "utterance": "check my balance", "frames": [{"actions": [{"act": "INFORM_INTENT"}]}]},
        {"speaker": "SYSTEM", "utterance": "which account?", "frames": [{"actions": [{"act": "REQUEST"}]}]},
        {"speaker": "USER", "utterance": "savings", "frames": [{"actions": [{"act": "INFORM"}]}]},
    ]}
    (tmp_path / D.SGD_SAMPLE).write_text(json.dumps([dialogue]))
    monkeypatch.setenv("COACT_DATA_DIR", str(tmp_path))
    turns = D.load_sgd_user_turns()
    assert [(t.utterance, t.pending, t.system_acts) for t in turns] == [
        ("check my balance", False, ()), ("savings", True, ("REQUEST",))]
    (tmp_path / D.SGD_SAMPLE).write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="SGD dialogues"):
        D.load_sgd_user_turns()


def test_sgd_labels_under_our_acts() -> None:
    def turn(text: str, *acts: str) -> D.SgdUserTurn:
        return D.SgdUserTurn("d", 2, text, tuple(sorted(acts)), ("OFFER",), ("Banks_1",))

    def labels(t: D.SgdUserTurn) -> dict[str, float]:
        return dict(zip(P.ACT_HEADS, P.sgd_act_labels(t).tolist(), strict=True))

    y = labels(turn("Sounds great, can you check my bank balance?", "SELECT", "INFORM_INTENT"))
    assert y["affirm"] == 1 and y["content"] == 1 and y["deny"] == 0 and y["greeting"] == 0
    y = labels(turn("No, that will be all.", "NEGATE", "THANK_YOU"))  # THANK_YOU without a thank-you: unknown
    assert y["deny"] == 1 and np.isnan(y["thanks"]) and np.isnan(y["goodbye"]) and y["content"] == 0
    y = labels(turn("Okay, thanks for your help!", "GOODBYE", "SELECT"))  # a closing SELECT is no yes
    assert y["goodbye"] == 1 and np.isnan(y["affirm"]) and np.isnan(y["thanks"])
    y = labels(turn("Hi there! Could you find me a concert?", "INFORM_INTENT"))  # unlabelled greeting: unknown
    assert np.isnan(y["greeting"]) and y["content"] == 1


def test_heldout_files_are_apart_from_the_training_examples() -> None:
    held = P.load_acts_heldout()
    per_act = {a: sum(a in m["acts"] for m in held) for a in get_args(ActName)}
    assert min(per_act.values()) >= 15, per_act
    assert {m["pending"] for m in held} == {True, False}
    assert sum(len(m["acts"]) > 1 for m in held) >= 10  # combined acts
    pack_texts = {normalise(r["text"]) for r in P.pack_act_rows(PACK)}
    assert not [m["text"] for m in held if normalise(m["text"]) in pack_texts]
    answers = P.load_answers_heldout()
    examples = {normalise(t) for q in PACK.questions for texts in q.answer_examples.values() for t in texts}
    assert not [t for states in answers.values() for texts in states.values() for t in texts
                if normalise(t) in examples | pack_texts]
    assert set(answers) == {q.variable for q in PACK.questions}


# ---------------------------------------------------------------- the pack


def test_pack_acts_and_answer_examples() -> None:
    assert set(PACK.acts) == set(get_args(ActName))
    rows = {r["text"]: r for r in P.pack_act_rows(PACK)}
    assert rows["thanks, bye"]["acts"] == {"thanks", "goodbye"} and rows["thanks, bye"]["content"] is False
    assert rows["no, I meant the transfer"]["acts"] == {"correction", "deny"}
    assert rows["no, I meant the transfer"]["content"] is True
    assert rows["yes please freeze it"]["acts"] == {"affirm"} and rows["yes please freeze it"]["content"] is True
    assert rows["this is useless, give me a human"]["content"] is None  # either reading: not trained on
    for q in PACK.questions:
        assert set(q.answer_examples) == {"yes", "no"}, q.variable
        assert all(8 <= len(v) <= 15 for v in q.answer_examples.values()), q.variable


def test_bad_answer_state_names_the_field() -> None:
    old = '      "no": ["I lost it", "the ATM kept it"'
    assert old in BANKING
    with pytest.raises(DomainPackError, match=r"questions\.q_card_in_hand\.answer_examples: 'maybe' is not a state"):
        parse_pack(BANKING.replace(old, '      "maybe": ["I lost it", "the ATM kept it"', 1))


def test_missing_act_is_an_error() -> None:
    start = BANKING.index("  correction:\n")
    end = BANKING.index("\n# Observable variables")
    with pytest.raises(DomainPackError, match=r"acts: missing \['correction'\]"):
        parse_pack(BANKING[:start] + BANKING[end:])


# ---------------------------------------------------------------- the built part


def test_acts_part_is_built_and_scored(models_dir: Path, classifier: A.ActClassifier) -> None:
    manifest = json.loads((models_dir / P.MANIFEST).read_text())
    metrics = manifest["metrics"]["acts"]
    assert classifier.version == manifest["versions"]["acts"]
    assert classifier.meta["metrics"] == metrics
    assert classifier.heads == [*get_args(ActName), "content"]
    assert classifier.features in A.FEATURE_KINDS
    assert set(classifier.thresholds) == set(classifier.heads)
    held = metrics["heldout"]
    assert held["macro_f1_acts"] >= MIN_MACRO_F1, P.format_act_table(held)
    for act in get_args(ActName):
        assert held[act]["f1"] >= MIN_ACT_F1, (act, P.format_act_table(held))
        assert held[act]["support"] >= 15
    assert held["content"]["f1"] >= MIN_CONTENT_F1
    sizes = metrics["split_sizes"]
    assert sizes["test"] == metrics["split_sizes_by_source"]["test/sgd"] + metrics["split_sizes_by_source"]["test/heldout"]
    assert metrics["sgd_dialogues"]["test"] >= 20
    assert set(metrics["feature_variants"]) == set(A.FEATURE_KINDS)
    assert metrics["answers"]["heldout_accuracy"] >= MIN_ANSWER_ACCURACY


def test_read_acts_on_new_wordings(classifier: A.ActClassifier, encoder: M.TextEncoder) -> None:
    """Wordings in neither the training data nor the held-out file."""
    cases = [  # text, pending, acts that must be read, acts that must not, content expected
        ("cheers mate, that's everything", False, {"thanks"}, {"affirm", "deny", "request_human"}, False),
        ("could I get a human on the line", False, {"request_human"}, {"affirm", "greeting"}, None),
        ("hmm, no idea", True, {"unsure"}, {"affirm", "deny"}, False),
        ("yep", True, {"affirm"}, {"deny", "unsure"}, False),
        ("nope", False, {"deny"}, {"affirm"}, False),
        ("I never made that payment", True, set(), {"affirm", "deny", "greeting", "thanks"}, True),
    ]
    seen = {normalise(r["text"]) for r in P.pack_act_rows(PACK)} | {normalise(m["text"]) for m in P.load_acts_heldout()}
    for text, *_ in cases[:3]:
        assert normalise(text) not in seen, text
    texts = [c[0] for c in cases]
    reading = A.read_acts(classifier, encoder.embed(texts), np.array([c[1] for c in cases]))
    assert reading.acts.shape == (len(cases), len(get_args(ActName))) and reading.content.shape == (len(cases),)
    assert np.all((reading.acts >= 0) & (reading.acts <= 1))
    for i, (text, _, must, must_not, content) in enumerate(cases):
        got = set(reading.detected(i))
        assert must <= got and not (must_not & got), (text, reading.probs(i))
        if content is not None:
            assert reading.has_content(i) == content, (text, float(reading.content[i]))
    # One pending flag for the whole batch, or one per message.
    one = A.read_acts(classifier, encoder.embed(["yes"]), True)
    assert one.detected(0) == ["affirm"]
    with pytest.raises(ValueError, match="pending"):
        A.read_acts(classifier, encoder.embed(["a", "b"]), [True, False, True])


def test_answers_in_words(classifier: A.ActClassifier, encoder: M.TextEncoder) -> None:
    reader = A.AnswerReader.from_pack(PACK, encoder.embed, **classifier.answer_reader)
    assert set(reader.variables) == {q.variable for q in PACK.questions}
    held = P.load_answers_heldout()
    ok = n = 0
    for var, states in held.items():
        for state, texts in states.items():
            if state == "none":
                continue
            for row in encoder.embed(texts):
                reading = reader.read(var, row)
                assert reading is not None and set(reading.scores) == {"yes", "no"}
                assert abs(sum(reading.scores.values()) - 1) < 1e-3
                ok, n = ok + (reading.state == state), n + 1
    assert ok / n >= MIN_ANSWER_ACCURACY, f"{ok}/{n}"
    emb = encoder.embed(["it was declined", "what's the weather in Oslo?"])
    assert reader.read("q_payment_pending", emb[0]).state == "no"
    assert reader.read("q_payment_pending", emb[1]).state is None
    assert reader.read(None, emb[0]) is None and reader.read("no_such_question", emb[0]) is None


def test_intent_results_carry_acts_and_the_answer(models_dir: Path, classifier: A.ActClassifier,
                                                  encoder: M.TextEncoder) -> None:
    from coact.actors.intent_models import load_intent_model

    intent = load_intent_model(M.intent_path(models_dir))
    reader = A.AnswerReader.from_pack(PACK, encoder.embed, **classifier.answer_reader)
    requests = [IntentRequest(message="thanks, bye"),
                IntentRequest(message="no, it was me who bought it", pending="q_someone_else"),
                IntentRequest(message="my card hasn't arrived", pending="not_a_question")]
    emb = encoder.embed([r.message for r in requests])
    results = understand(requests, emb, intent, classifier, reader, PACK.out_of_scope_label)
    assert [set(r.acts) for r in results] == [set(get_args(ActName))] * 3
    assert results[0].acts["thanks"] > 0.5 and results[0].acts["goodbye"] > 0.5 and results[0].content < 0.5
    assert results[0].answer is None and results[2].answer is None
    assert results[1].answer is not None and results[1].answer.state == "no"
    assert results[2].content > 0.5 and results[2].top[0].label == "card_arrival"
    assert results[0].model_version == intent.version
    back = type(results[1]).model_validate_json(results[1].model_dump_json())
    assert back == results[1]
