"""Small VQA v2-format files written by tests (real json in the official schema)."""

from __future__ import annotations

import json
from pathlib import Path

from gridvqa.data import layout


def write_split(root: Path, split: str, items: list[tuple[int, int, str, list[str], str]]) -> None:
    """items: (question_id, image_id, question, ten answers, answer_type); no answers -> test split."""
    sub = layout.official_split(split)
    qs = {
        "data_subtype": sub,
        "questions": [{"image_id": iid, "question": q, "question_id": qid} for qid, iid, q, _, _ in items],
    }
    qp = layout.questions_path(root, split)
    qp.parent.mkdir(parents=True, exist_ok=True)
    qp.write_text(json.dumps(qs))
    if all(ans for _, _, _, ans, _ in items):
        anns = {
            "data_subtype": sub,
            "annotations": [
                {
                    "question_id": qid,
                    "image_id": iid,
                    "question_type": " ".join(q.lower().split()[:3]),
                    "answer_type": at,
                    "multiple_choice_answer": ans[0],
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                        for k, a in enumerate(ans)
                    ],
                }
                for qid, iid, q, ans, at in items
            ],
        }
        layout.annotations_path(root, split).write_text(json.dumps(anns))
