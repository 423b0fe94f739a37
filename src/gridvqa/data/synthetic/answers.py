"""Ten human-like answers per question (spelling variants the official normaliser maps back, a few
wrong ones) and the blind prior a question-only model could reach."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from gridvqa.data.synthetic.objects import OPPOSITE, SHAPES, YES_NO
from gridvqa.data.synthetic.templates import FAMILIES
from gridvqa.metrics.vqa_eval import normalize_answer, vqa_accuracy

NUM_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
WRONG_RATE = 0.05  # share of human answers that are plain wrong
MAX_WRONG = 3  # per question, so the true answer always keeps the majority
VARIANT_RATE = 0.35  # share of correct human answers typed another (normalisable) way


# ----------------------------------------------------------------------------------------------
# Human answers


def answer_variants(ans: str) -> list[str]:
    """Other ways a person types `ans` that the official normaliser maps back to it."""
    if ans.isdigit():
        word = NUM_WORDS[int(ans)] if int(ans) < len(NUM_WORDS) else ans
        return [word, word.capitalize(), f"{ans}."] + (["none"] if ans == "0" else [])
    if ans in YES_NO:
        return [ans.capitalize(), f"{ans}.", ans.upper()]
    if ans in SHAPES:
        return [ans.capitalize(), f"a {ans}", f"{ans}."]
    if ans in OPPOSITE:
        return [ans.capitalize(), f"{ans}.", f"the {ans}"] if ans in ("left", "right") else [ans.capitalize(),
                                                                                              f"{ans}."]
    return [ans.capitalize(), f"{ans}.", f"{ans}!"]


def human_answers(ans: str, domain: Sequence[str], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Ten answer records: mostly `ans` (sometimes spelt differently), ~5 % another answer of the domain.

    At most MAX_WRONG are wrong, so the majority (multiple_choice_answer) is always the true answer.
    """
    wrong_pool = [a for a in domain if a != ans]
    n_wrong = min(int(rng.binomial(10, WRONG_RATE)), MAX_WRONG) if wrong_pool else 0
    wrong_at = set(rng.choice(10, size=n_wrong, replace=False).tolist())
    variants = answer_variants(ans)
    texts, conf = [], []
    for k in range(10):
        if k in wrong_at:
            texts.append(wrong_pool[int(rng.integers(len(wrong_pool)))])
            conf.append(("maybe", "no", "yes")[int(rng.integers(3))])
            continue
        texts.append(variants[int(rng.integers(len(variants)))] if rng.random() < VARIANT_RATE else ans)
        u = rng.random()
        conf.append("yes" if u < 0.85 else "maybe" if u < 0.97 else "no")
    if len(set(texts)) == 1:
        # Unanimous humans are not normalised by the official scorer: keep them in canonical form.
        texts = [ans] * 10
    return [{"answer": t, "answer_confidence": c, "answer_id": k + 1}
            for k, (t, c) in enumerate(zip(texts, conf, strict=True))]


def majority_answer(records: Sequence[dict[str, Any]]) -> str:
    return Counter(normalize_answer(r["answer"]) for r in records).most_common(1)[0][0]


# ----------------------------------------------------------------------------------------------
# Blind prior


def blind_prior(train: Sequence[dict], val: Sequence[dict]) -> dict[str, Any]:
    """VQA accuracy on `val` of (a) the best answer per family and (b) per exact question string.

    Items: {"family", "question", "multiple_choice_answer", "answers": [raw strings]}. Best answers are
    the most frequent multiple_choice_answer on train (ties: alphabetical); (b) falls back to (a).
    """
    fam_counts: dict[str, Counter] = defaultdict(Counter)
    q_counts: dict[str, Counter] = defaultdict(Counter)
    for it in train:
        fam_counts[it["family"]][it["multiple_choice_answer"]] += 1
        q_counts[it["question"]][it["multiple_choice_answer"]] += 1

    def best(c: Counter) -> str:
        return min(c, key=lambda a: (-c[a], a))

    fam_best = {f: best(c) for f, c in fam_counts.items()}
    q_best = {q: best(c) for q, c in q_counts.items()}
    per: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for it in val:
        a = fam_best.get(it["family"], "yes")
        b = q_best.get(it["question"], a)
        per[it["family"]].append((vqa_accuracy(a, it["answers"]), vqa_accuracy(b, it["answers"])))

    def pct(xs: list[float]) -> float | None:
        return round(100.0 * sum(xs) / len(xs), 2) if xs else None

    out: dict[str, Any] = {"per_family": {}}
    for f in FAMILIES:
        xs = per.get(f, [])
        out["per_family"][f] = {
            "questions": len(xs),
            "family_best_answer": fam_best.get(f),
            "family_prior": pct([x[0] for x in xs]),
            "question_prior": pct([x[1] for x in xs]),
        }
    allx = [x for xs in per.values() for x in xs]
    out["overall"] = {"questions": len(allx), "family_prior": pct([x[0] for x in allx]),
                      "question_prior": pct([x[1] for x in allx])}
    return out
