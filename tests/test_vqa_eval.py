"""The official VQA scorer: every normalisation rule and quirk on hand-worked cases, files, CLI, Metric."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from gridvqa.errors import DataError
from gridvqa.metrics.vqa_eval import (
    evaluate,
    load_results,
    normalize_answer,
    official_round,
    vqa_accuracy,
    write_results,
)
from gridvqa.metrics.vqa_metric import VQAAccuracy


def ten(*groups: tuple[str, int]) -> list[str]:
    out = [a for a, n in groups for _ in range(n)]
    assert len(out) == 10
    return out


# --- normalisation ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, norm", [
    ("yes!", "yes"),                # mark touching no space -> space, then split/join
    ("t-shirt", "t shirt"),
    ("hi ; there", "hi there"),     # mark next to a space -> removed
    ("red, white", "red white"),
    ("red,white", "red white"),
    ("what?", "what"),
    ("(left)", "left"),
    ("it's", "it's"),               # apostrophe is not in the official list
    ("black & white", "black & white"),
    ("\tyes \n", "yes"),
])
def test_punctuation(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("raw, norm", [
    ("2.5", "2.5"),                 # a period before a digit stays
    ("3.", "3"),
    ("mr. smith", "mr smith"),
    ("a.b.c", "abc"),               # removed, not spaced
    (".5", ".5"),
    ("." * 40 + "x", "." * 8 + "x"),  # upstream passes re.UNICODE (32) as sub()'s count
])
def test_period_strip(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("raw, norm", [
    ("1,000", "1000"),
    ("2,000-3,000", "20003000"),    # a digit-comma-digit anywhere makes every mark vanish...
    ("2000-3000", "2000 3000"),     # ...otherwise the dash is a space
    ("1,000 (about)", "1000 about"),
])
def test_digit_comma(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("raw, norm", [
    ("two", "2"), ("Two dogs", "2 dogs"), ("ten", "10"), ("none", "0"), ("zero", "0"),
    ("eleven", "eleven"), ("twenty", "twenty"),
])
def test_number_words(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("raw, norm", [
    ("a dog", "dog"), ("The Cat", "cat"), ("an apple", "apple"), ("the", ""), ("another", "another"),
    ("on the table", "on table"),
])
def test_articles(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("raw, norm", [
    ("dont", "don't"), ("isnt", "isn't"), ("Cant", "can't"), ("oclock", "o'clock"), ("twas", "'twas"),
    ("somebody'd", "somebodyd"),    # an upstream oddity, copied
    ("Im", "im"),                   # upstream key "Im" can never match after lower()
    ("i dont know", "i don't know"),
])
def test_contractions(raw, norm):
    assert normalize_answer(raw) == norm


# --- per-question accuracy ----------------------------------------------------------------------

@pytest.mark.parametrize("m, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out(m, expected):
    # m matching humans see m-1 matches among the other nine, the 10-m others see m: e.g. m=3 ->
    # (3 * 2/3 + 7 * 1) / 10 = 0.9
    humans = ten(("cat", m), ("dog", 10 - m)) if m < 10 else ten(("cat", 10))
    assert vqa_accuracy("cat", humans) == pytest.approx(expected, abs=1e-12)


def test_identical_answers_are_not_normalised():
    yes10 = ten(("yes", 10))
    assert vqa_accuracy("yes", yes10) == 1.0
    assert vqa_accuracy(" yes\n", yes10) == 1.0       # whitespace cleanup always happens
    assert vqa_accuracy("yes!", yes10) == 0.0         # but punctuation is not stripped...
    assert vqa_accuracy("Yes", yes10) == 0.0          # ...nor case folded
    assert vqa_accuracy("two", ten(("Two", 10))) == 0.0
    assert vqa_accuracy("Two", ten(("Two", 10))) == 1.0
    # one differing human switches normalisation on for humans and prediction alike
    assert vqa_accuracy("Yes!", ten(("yes", 9), ("yes!", 1))) == 1.0
    assert vqa_accuracy("2", ten(("two", 5), ("Two.", 5))) == 1.0
    assert vqa_accuracy("a dog", ten(("dog", 2), ("the dog", 1), ("cat", 7))) == pytest.approx(0.9)


def test_vqa_accuracy_rejects_no_answers():
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_python2_rounding():
    assert official_round(3.125) == 3.13              # exact tie: away from zero (py3 round -> 3.12)
    assert official_round(2.675) == 2.67              # not a tie in binary
    assert official_round(47.5) == 47.5


# --- files and evaluate() -----------------------------------------------------------------------

def write_vqa(tmp_path, items, results, raw=False):
    """items: (qid, question_type, answer_type, ten answers); results: {qid: answer}, or any json if raw."""
    q = {"questions": [{"image_id": 7, "question": "?", "question_id": qid} for qid, *_ in items]}
    a = {"annotations": [
        {"question_id": qid, "image_id": 7, "question_type": qt, "answer_type": at,
         "multiple_choice_answer": ans[0],
         "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1}
                     for k, x in enumerate(ans)]}
        for qid, qt, at, ans in items]}
    paths = tmp_path / "q.json", tmp_path / "a.json", tmp_path / "r.json"
    paths[0].write_text(json.dumps(q))
    paths[1].write_text(json.dumps(a))
    res = results if raw else [{"question_id": k, "answer": v} for k, v in results.items()]
    paths[2].write_text(json.dumps(res))
    return paths


ITEMS = [
    (1, "what color is", "other", ten(("red", 10))),
    (2, "how many", "number", ten(("2", 1), ("3", 9))),
    (3, "is the", "yes/no", ten(("yes", 6), ("no", 4))),
    (4, "what color is", "other", ten(("blue", 2), ("green", 8))),
]
PREDS = {1: "red", 2: "two", 3: "maybe", 4: "Blue."}   # accuracies 1.0, 0.3, 0.0, 0.6


def test_evaluate_aggregates_per_type(tmp_path):
    out = evaluate(*write_vqa(tmp_path, ITEMS, PREDS))
    assert out == {
        "overall": 47.5,                                # (1 + .3 + 0 + .6) / 4
        "perAnswerType": {"other": 80.0, "number": 30.0, "yes/no": 0.0},
        "perQuestionType": {"what color is": 80.0, "how many": 30.0, "is the": 0.0},
    }


def test_evaluate_accepts_loaded_objects(tmp_path):
    qp, ap, rp = write_vqa(tmp_path, ITEMS, PREDS)
    objs = [json.loads(p.read_text()) for p in (qp, ap, rp)]
    before = json.dumps(objs[1])
    assert evaluate(*objs) == evaluate(qp, ap, rp)
    assert json.dumps(objs[1]) == before                # annotations are not normalised in place


def test_evaluate_rounds_like_python2(tmp_path):
    items = [(k, "what", "other", ten(("a", 10))) for k in range(32)]
    preds = {k: ("a" if k == 0 else "b") for k in range(32)}
    assert evaluate(*write_vqa(tmp_path, items, preds))["overall"] == 3.13     # 100/32 = 3.125


def test_missing_and_extra_ids(tmp_path):
    preds = {2: "3", 3: "yes", 4: "green", 99: "x", 100: "y"}
    with pytest.raises(DataError) as e:
        evaluate(*write_vqa(tmp_path, ITEMS, preds))
    msg = str(e.value)
    assert "\n" not in msg and "r.json" in msg
    assert "1 missing (e.g. 1)" in msg and "2 extra (e.g. 99, 100)" in msg


@pytest.mark.parametrize("results, fragment", [
    ({"question_id": 1, "answer": "x"}, "must be a json list"),
    ([{"question_id": "1", "answer": "x"}], "entry 0"),
    ([{"question_id": 1, "answer": 3}], "entry 0"),
    ([{"question_id": True, "answer": "x"}], "entry 0"),
    ([{"question_id": 1, "answer": "x"}, {"question_id": 1, "answer": "y"}], "more than once: 1"),
])
def test_bad_results_entries(tmp_path, results, fragment):
    *_, rp = write_vqa(tmp_path, ITEMS, results, raw=True)
    with pytest.raises(DataError, match=fragment) as e:
        load_results(rp)
    assert str(e.value).startswith(str(rp)) and "\n" not in str(e.value)


def test_malformed_results_json(tmp_path):
    qp, ap, rp = write_vqa(tmp_path, ITEMS, PREDS)
    rp.write_text('[{"question_id": 1, "answer": "x"},\n oops]')
    with pytest.raises(DataError, match=r"r\.json: malformed json at line 2"):
        evaluate(qp, ap, rp)


def test_annotation_must_cover_questions(tmp_path):
    qp, ap, rp = write_vqa(tmp_path, ITEMS, PREDS)
    a = json.loads(ap.read_text())
    a["annotations"] = a["annotations"][1:]
    ap.write_text(json.dumps(a))
    with pytest.raises(DataError, match=r"a\.json: no annotation for 1 question"):
        evaluate(qp, ap, rp)


def test_write_and_load_results(tmp_path):
    p = write_results(tmp_path / "sub" / "res.json", [(np.int64(5), "two"), (6, "yes")])
    assert load_results(p) == [{"question_id": 5, "answer": "two"}, {"question_id": 6, "answer": "yes"}]
    write_results(p, [{"question_id": 7, "answer": "no", "score": 0.3}])
    assert json.loads(p.read_text()) == [{"question_id": 7, "answer": "no"}]
    with pytest.raises(DataError, match="res.json"):
        write_results(p, [(8, 3)])
    with pytest.raises(DataError, match="more than once"):
        write_results(p, [(8, "a"), (8, "b")])
    assert json.loads(p.read_text()) == [{"question_id": 7, "answer": "no"}]      # failed writes leave it


# --- CLI ----------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gridvqa.metrics.vqa_eval", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_cli_prints_one_json_object(tmp_path):
    qp, ap, rp = write_vqa(tmp_path, ITEMS, PREDS)
    r = run_cli("--questions", qp, "--annotations", ap, "--results", rp)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == evaluate(qp, ap, rp)
    assert list(json.loads(lines[0])) == ["overall", "perAnswerType", "perQuestionType"]


def test_cli_missing_ids_fail_with_one_line(tmp_path):
    qp, ap, rp = write_vqa(tmp_path, ITEMS, {1: "red", 2: "3"})
    r = run_cli("--questions", qp, "--annotations", ap, "--results", rp)
    assert r.returncode != 0 and r.stdout == ""
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "2 missing (e.g. 3, 4)" in err[0] and str(rp) in err[0]


def test_scorer_stays_light():
    code = ("import sys, gridvqa.metrics.vqa_eval; "
            "heavy = [m for m in ('torch', 'numpy', 'torchmetrics', 'lightning') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- torchmetrics Metric ------------------------------------------------------------------------

BATCH_PREDS = ["red", "two", "maybe", "Blue.", "yes!"]
BATCH_HUMANS = [it[3] for it in ITEMS] + [ten(("yes", 10))]
BATCH_TYPES = ["other", "number", "yes/no", "other", "yes/no"]


def test_metric_matches_function():
    m = VQAAccuracy()
    m.update(BATCH_PREDS[:2], BATCH_HUMANS[:2])
    m.update(BATCH_PREDS[2:], BATCH_HUMANS[2:])
    per_question = [vqa_accuracy(p, h) for p, h in zip(BATCH_PREDS, BATCH_HUMANS, strict=True)]
    expected = sum(per_question) / len(per_question)
    assert m.compute().item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(1.9 / 5)


def test_metric_per_answer_type_and_scores():
    m = VQAAccuracy(per_answer_type=True)
    m.update(BATCH_PREDS, BATCH_HUMANS, BATCH_TYPES)
    out = {k: v.item() for k, v in m.compute().items()}
    assert out == pytest.approx({"overall": 1.9 / 5, "yes_no": 0.0, "number": 0.3, "other": 0.8})
    s = VQAAccuracy(per_answer_type=True)
    s.update(scores=torch.tensor([1.0, 0.3, 0.0, 0.6, 0.0]), answer_types=BATCH_TYPES)
    assert {k: v.item() for k, v in s.compute().items()} == pytest.approx(out)
    with pytest.raises(ValueError, match="unknown answer type"):
        s.update(scores=[1.0], answer_types=["color"])
    with pytest.raises(ValueError, match="either preds"):
        s.update(BATCH_PREDS, BATCH_HUMANS, BATCH_TYPES, scores=[1.0] * 5)


def test_metric_states_sum_across_processes():
    # What a DDP sync does: every state is summed. Two halves merged must equal the whole.
    whole, a, b = (VQAAccuracy(per_answer_type=True) for _ in range(3))
    whole.update(BATCH_PREDS, BATCH_HUMANS, BATCH_TYPES)
    a.update(BATCH_PREDS[:3], BATCH_HUMANS[:3], BATCH_TYPES[:3])
    b.update(BATCH_PREDS[3:], BATCH_HUMANS[3:], BATCH_TYPES[3:])
    a.merge_state(b)
    assert set(a._reductions) == {"score_sum", "count", "type_sum", "type_count"}
    for k, v in whole.compute().items():
        assert a.compute()[k].item() == pytest.approx(v.item())
