"""The official VQA v2 accuracy, reproduced number for number, plus result-file I/O and a CLI.

    python -m gridvqa.metrics.vqa_eval --questions Q.json --annotations A.json --results R.json

prints `{"overall": .., "perAnswerType": {..}, "perQuestionType": {..}}` in percent, two decimals.

Reference: GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py (master, a013f00).
Hand-written rather than vendored because the official tool is Python 2, reads files through its own
loader and prints progress bars; the rules below follow it exactly, quirks included:

* Every answer gets '\\n'/'\\t' -> ' ' and strip().
* Only when the (stripped) human answers are NOT all identical are the human answers *and* the
  prediction normalised (punctuation, then number words / articles / contractions). When the ten
  humans agree, the prediction must match them character for character ("yes!" scores 0 vs "yes").
* Each human answer is scored against the other humans: min(1, matches / 3); the question's score is
  the mean. "Other" means every answer record that is not equal to this one (the official compares
  the answer dicts, so two byte-identical records would exclude each other; real files never have
  them since answer_id differs).
* Scores are averaged over questions, per answer type and per question type, and rounded the
  Python 2 way (exact ties away from zero; Python 3's round() sends them to even).

This module must stay light (standard library only): the data pipeline imports `normalize_answer`.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from gridvqa.data.jsonio import atomic_write_json, load_json
from gridvqa.errors import DataError, GridVQAError

# Copied from the official tool (keys with a capital I can never match after lower(); kept anyway).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
PUNCT: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                          ">", "<", "@", "`", ",", "?", "!")
# Verbatim, typo included: "(?!<=\d)" is a look-ahead, so this drops every '.' not followed by a digit.
# re.ASCII because the py2 original compiled byte-string patterns, where \d is [0-9] only.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)", re.ASCII)
# The official passes re.UNICODE (== 32) as sub()'s third positional argument, i.e. count=32.
_PERIOD_STRIP_COUNT = int(re.UNICODE)

ANSWER_TYPES: tuple[str, ...] = ("yes/no", "number", "other")


def clean_whitespace(ans: str) -> str:
    """The cleanup every answer gets, normalised or not: newlines/tabs to spaces, then strip."""
    return ans.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Official `processPunctuation`: drop a mark if it touches a space (or the text has a digit-comma-
    digit anywhere), otherwise turn it into a space; then drop periods that are not before a digit."""
    out = text
    drop_all = COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        # The test reads the original text while the replacements accumulate in `out`, as upstream.
        if drop_all or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lower-case, number words to digits, drop articles, contractions."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(ans: str) -> str:
    """The full official normalisation (what it applies in the non-identical-humans branch)."""
    return process_digit_article(process_punctuation(clean_whitespace(ans)))


def _question_accuracy(pred: str, records: list[dict[str, Any]]) -> float:
    """Score one question; `records` are the annotation's answer dicts (only 'answer' is changed here)."""
    pred = clean_whitespace(pred)
    recs = [{**r, "answer": clean_whitespace(r["answer"])} for r in records]
    if len({r["answer"] for r in recs}) > 1:
        recs = [{**r, "answer": process_digit_article(process_punctuation(r["answer"]))} for r in recs]
        pred = process_digit_article(process_punctuation(pred))
    accs = []
    for rec in recs:
        # Leave-one-out by record inequality, exactly as upstream (see the module docstring).
        matches = sum(1 for other in recs if other != rec and other["answer"] == pred)
        accs.append(min(1, matches / 3))
    return sum(accs) / len(accs)


def vqa_accuracy(pred: str, human_answers: Sequence[str]) -> float:
    """Official per-question accuracy in [0, 1] of `pred` against the human answers (usually ten)."""
    if isinstance(human_answers, str) or not human_answers:
        raise ValueError("vqa_accuracy needs a non-empty list of human answer strings")
    # answer_id makes every record distinct, as in the official files.
    return _question_accuracy(pred, [{"answer": a, "answer_id": i} for i, a in enumerate(human_answers)])


def official_round(x: float, ndigits: int = 2) -> float:
    """Python 2's round(): correctly rounded, exact binary ties away from zero (e.g. 3.125 -> 3.13)."""
    return float(Decimal(x).quantize(Decimal(1).scaleb(-ndigits), rounding=ROUND_HALF_UP))


# ----------------------------------------------------------------------------------------------
# Files


def _name(src: object, what: str) -> str:
    return str(src) if isinstance(src, (str, os.PathLike)) else f"<{what}>"


def _sample(ids: Iterable[int], k: int = 5) -> str:
    s = sorted(ids)
    return ", ".join(str(i) for i in s[:k]) + (", ..." if len(s) > k else "")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _records(obj: object, key: str, name: str) -> list[dict[str, Any]]:
    if not isinstance(obj, Mapping) or not isinstance(obj.get(key), list):
        raise DataError(f"{name}: expected a json object with a {key!r} list")
    for i, r in enumerate(obj[key]):
        if not isinstance(r, Mapping) or not _is_int(r.get("question_id")):
            raise DataError(f"{name}: {key}[{i}] has no integer 'question_id'")
    return obj[key]


def _load_questions(src: Mapping | str | os.PathLike) -> tuple[list[int], str]:
    name = _name(src, "questions")
    obj = load_json(src, "VQA questions") if isinstance(src, (str, os.PathLike)) else src
    ids = [q["question_id"] for q in _records(obj, "questions", name)]
    dup = {i for i, n in Counter(ids).items() if n > 1}
    if dup:
        raise DataError(f"{name}: {len(dup)} question_id(s) appear more than once: {_sample(dup)}")
    return ids, name


def _load_annotations(src: Mapping | str | os.PathLike) -> tuple[dict[int, dict[str, Any]], str]:
    name = _name(src, "annotations")
    obj = load_json(src, "VQA annotations") if isinstance(src, (str, os.PathLike)) else src
    anns: dict[int, dict[str, Any]] = {}
    for i, a in enumerate(_records(obj, "annotations", name)):
        answers = a.get("answers")
        if not isinstance(answers, list) or not answers:
            raise DataError(f"{name}: annotations[{i}] (question {a['question_id']}) has no 'answers' list")
        if not all(isinstance(r, Mapping) and isinstance(r.get("answer"), str) for r in answers):
            raise DataError(f"{name}: annotations[{i}] (question {a['question_id']}): every answer needs "
                            "a string 'answer'")
        for key in ("question_type", "answer_type"):
            if not isinstance(a.get(key), str):
                raise DataError(f"{name}: annotations[{i}] (question {a['question_id']}) "
                                f"has no string {key!r}")
        anns[a["question_id"]] = a  # last one wins, as in the official index
    return anns, name


def _validate_results(obj: object, name: str) -> list[dict[str, Any]]:
    if not isinstance(obj, list):
        raise DataError(f'{name}: results must be a json list of {{"question_id": int, "answer": str}}, '
                        f"got {type(obj).__name__}")
    seen: set[int] = set()
    dup: set[int] = set()
    for i, r in enumerate(obj):
        ok = isinstance(r, Mapping) and _is_int(r.get("question_id")) and isinstance(r.get("answer"), str)
        if not ok:
            raise DataError(f'{name}: entry {i} is not {{"question_id": int, "answer": str}}: {r!r:.80}')
        (dup if r["question_id"] in seen else seen).add(r["question_id"])
    if dup:
        raise DataError(f"{name}: {len(dup)} question_id(s) answered more than once: {_sample(dup)}")
    return obj


def load_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and validate a results file `[{"question_id": int, "answer": str}, ...]`."""
    return _validate_results(load_json(path, "VQA results"), str(path))


RESULTS_NAME = "vqa_OpenEnded_mscoco_{split}_gridvqa_results.json"  # the official results-file naming


def accuracy_path(results_path: str | Path) -> Path:
    """Where the scores of a results file go: `..._results.json` -> `..._accuracy.json`, the official
    tool's naming (its accuracy file holds the same {"overall", "perQuestionType", "perAnswerType"})."""
    p = Path(results_path)
    return p.with_name(p.name.removesuffix(".json").removesuffix("_results") + "_accuracy.json")


def write_results(path: str | os.PathLike, items: Iterable[tuple[int, str]] | Iterable[Mapping]) -> Path:
    """Write `[{"question_id": int, "answer": str}]` atomically from (id, answer) pairs or dicts."""
    out = []
    for item in items:
        qid, ans = (item["question_id"], item["answer"]) if isinstance(item, Mapping) else item
        if isinstance(qid, bool) or not isinstance(ans, str):
            raise DataError(f"{path}: cannot write result ({qid!r}, {ans!r}): need (int id, str answer)")
        # operator.index accepts numpy / torch integers without importing them.
        out.append({"question_id": operator.index(qid), "answer": ans})
    _validate_results(out, str(path))
    return atomic_write_json(path, out)


# ----------------------------------------------------------------------------------------------
# Evaluation


def evaluate(questions: Mapping | str | os.PathLike, annotations: Mapping | str | os.PathLike,
             results: Sequence[Mapping] | str | os.PathLike) -> dict[str, Any]:
    """Official accuracy of `results` on the questions of `questions` (dicts as loaded, or paths).

    The results must answer exactly the question file's ids; the annotations must cover them (extra
    annotations are ignored, so a question file may select a subset of a split).
    """
    qids, qname = _load_questions(questions)
    anns, aname = _load_annotations(annotations)
    if isinstance(results, (str, os.PathLike)):
        res, rname = load_results(results), str(results)
    else:
        rname = "<results>"
        res = _validate_results(results, rname)

    no_ann = set(qids) - anns.keys()
    if no_ann:
        raise DataError(f"{aname}: no annotation for {len(no_ann)} question(s) of {qname}: {_sample(no_ann)}")
    pred = {r["question_id"]: r["answer"] for r in res}
    missing, extra = set(qids) - pred.keys(), pred.keys() - set(qids)
    if missing or extra:
        parts = [f"{len(missing)} missing (e.g. {_sample(missing)})" if missing else "",
                 f"{len(extra)} extra (e.g. {_sample(extra)})" if extra else ""]
        raise DataError(f"{rname}: results must answer exactly the questions of {qname}: "
                        + ", ".join(p for p in parts if p))

    acc_all: list[float] = []
    by_qtype: dict[str, list[float]] = {}
    by_atype: dict[str, list[float]] = {}
    for qid in qids:
        ann = anns[qid]
        acc = _question_accuracy(pred[qid], ann["answers"])
        acc_all.append(acc)
        by_qtype.setdefault(ann["question_type"], []).append(acc)
        by_atype.setdefault(ann["answer_type"], []).append(acc)
    if not acc_all:
        raise DataError(f"{qname}: no questions to evaluate")

    def pct(xs: list[float]) -> float:
        # Same float expression as upstream: round(100*float(sum(x))/len(x), 2).
        return official_round(100 * float(sum(xs)) / len(xs), 2)

    return {
        "overall": pct(acc_all),
        "perAnswerType": {t: pct(v) for t, v in by_atype.items()},
        "perQuestionType": {t: pct(v) for t, v in by_qtype.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gridvqa.metrics.vqa_eval",
                                 description="Official VQA v2 accuracy of a results file (percent).")
    ap.add_argument("--questions", required=True, help="v2_OpenEnded_mscoco_*_questions.json")
    ap.add_argument("--annotations", required=True, help="v2_mscoco_*_annotations.json")
    ap.add_argument("--results", required=True, help='results json: [{"question_id": int, "answer": str}]')
    args = ap.parse_args(argv)
    try:
        scores = evaluate(args.questions, args.annotations, args.results)
    except GridVQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
