"""Make what training needs beside the raw data: the answer vocabulary and the question tokenizer.

    python -m gridvqa.data.prepare DATA_ROOT [--min-count 9] [--max-length 14]
        [--answer-splits train val] [--question-splits train val test test-dev vg] [--force]

As mcan-vqa builds them (utils/proc_ansdict.py, core/data/load_data.py), the defaults are:
- answers: the normalised `multiple_choice_answer` of train + val (val when its annotations exist)
  seen at least 9 times: the standard 3,129-answer list on VQA v2;
- question words: every question file present (train, val, test, test-dev, VG-QA), so a pretrained
  word vector reaches the words that only the test questions use.
Both are written under DATA_ROOT (`answers.json`, `tokenizer/`), where the data modules look for them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gridvqa.data import layout
from gridvqa.data.vqa2 import AnswerVocab, load_split, present_question_splits, split_names
from gridvqa.errors import DataError, GridVQAError


def default_answer_splits(root: str | Path) -> tuple[str, ...]:
    """train + val when val has annotations (the standard list), else train alone."""
    return ("train", "val") if layout.annotations_path(root, "val").is_file() else ("train",)


def prepare(
    root: str | Path,
    answer_splits: Sequence[str] | None = None,
    min_count: int = 9,
    max_length: int = 14,
    force: bool = False,
    question_splits: Sequence[str] | None = None,
) -> dict:
    """Build (or keep, when present and not `force`) the answer vocabulary and tokenizer.

    `answer_splits` (default `default_answer_splits`) count the answers; `question_splits` (default:
    every question file present) give the question words."""
    from gridvqa.data.text import build_tokenizer, save_tokenizer

    root = Path(root)
    ans_path, tok_dir = layout.answers_path(root), layout.tokenizer_dir(root)
    report: dict = {}
    if force or not ans_path.is_file():
        a_splits = split_names(list(answer_splits)) if answer_splits else default_answer_splits(root)
        entries = [e for s in a_splits for e in load_split(root, s, with_answers=True)]
        vocab = AnswerVocab.build(entries, min_count=min_count)
        vocab.save(ans_path)
        report["answers"] = (f"{len(vocab)} answers (min count {min_count}, from {'+'.join(a_splits)}) "
                             f"-> {ans_path}")
        report["coverage"] = round(vocab.coverage(entries), 4)
    else:
        report["answers"] = f"kept {ans_path}"
    if force or not (tok_dir / "tokenizer.json").is_file():
        q_splits = split_names(list(question_splits)) if question_splits else present_question_splits(root)
        if not q_splits:
            raise DataError(f"{layout.questions_path(root, 'train')}: no VQA questions file under {root}")
        questions = [e.question for s in q_splits for e in load_split(root, s, with_answers=False)]
        tok = build_tokenizer(questions, max_length=max_length)
        save_tokenizer(tok, tok_dir)
        report["tokenizer"] = f"{len(tok)} words (questions of {'+'.join(q_splits)}) -> {tok_dir}"
    else:
        report["tokenizer"] = f"kept {tok_dir}"
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gridvqa.data.prepare", description=__doc__.splitlines()[0])
    ap.add_argument("root", help="data root in the documented layout")
    ap.add_argument("--answer-splits", "--splits", nargs="+", default=None,
                    help="splits whose answers are counted (default: train and val when val has annotations)")
    ap.add_argument("--question-splits", nargs="+", default=None,
                    help="splits whose questions give the words (default: every questions file present)")
    ap.add_argument("--min-count", type=int, default=9, help="keep answers seen at least this often")
    ap.add_argument("--max-length", type=int, default=14, help="question length in tokens")
    ap.add_argument("--force", action="store_true", help="rebuild even when the files exist")
    args = ap.parse_args(argv)
    try:
        report = prepare(args.root, args.answer_splits, args.min_count, args.max_length, args.force,
                         question_splits=args.question_splits)
    except GridVQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for k, v in report.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
