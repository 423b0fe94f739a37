"""Make what training needs beside the raw data: the answer vocabulary and the question tokenizer.

    python -m gridvqa.data.prepare DATA_ROOT [--min-count 9] [--max-length 14] [--splits train] [--force]

Both are built from the training split only (as the standard 3,129-answer list) and written under
DATA_ROOT (`answers.json`, `tokenizer/`), where the data modules look for them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gridvqa.data import layout
from gridvqa.data.vqa2 import AnswerVocab, load_split
from gridvqa.errors import GridVQAError


def prepare(
    root: str | Path,
    splits: tuple[str, ...] = ("train",),
    min_count: int = 9,
    max_length: int = 14,
    force: bool = False,
) -> dict:
    """Build (or keep, when present and not `force`) the answer vocabulary and tokenizer."""
    from gridvqa.data.text import build_tokenizer, save_tokenizer

    root = Path(root)
    ans_path, tok_dir = layout.answers_path(root), layout.tokenizer_dir(root)
    report: dict = {}
    entries = None
    if force or not ans_path.is_file():
        entries = [e for s in splits for e in load_split(root, s, with_answers=True)]
        vocab = AnswerVocab.build(entries, min_count=min_count)
        vocab.save(ans_path)
        report["answers"] = f"{len(vocab)} answers (min count {min_count}) -> {ans_path}"
        report["coverage"] = round(vocab.coverage(entries), 4)
    else:
        report["answers"] = f"kept {ans_path}"
    if force or not (tok_dir / "tokenizer.json").is_file():
        if entries is None:
            entries = [e for s in splits for e in load_split(root, s, with_answers=False)]
        tok = build_tokenizer((e.question for e in entries), max_length=max_length)
        save_tokenizer(tok, tok_dir)
        report["tokenizer"] = f"{len(tok)} words -> {tok_dir}"
    else:
        report["tokenizer"] = f"kept {tok_dir}"
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gridvqa.data.prepare", description=__doc__.splitlines()[0])
    ap.add_argument("root", help="data root in the documented layout")
    ap.add_argument("--splits", nargs="+", default=["train"], help="splits to build from (default: train)")
    ap.add_argument("--min-count", type=int, default=9, help="keep answers seen at least this often")
    ap.add_argument("--max-length", type=int, default=14, help="question length in tokens")
    ap.add_argument("--force", action="store_true", help="rebuild even when the files exist")
    args = ap.parse_args(argv)
    try:
        report = prepare(args.root, tuple(args.splits), args.min_count, args.max_length, args.force)
    except GridVQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for k, v in report.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
