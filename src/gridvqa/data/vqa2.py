"""VQA v2 reader: questions + annotations in the official json format, answer vocabulary, soft scores.

The same code reads the built-in synthetic set and a real VQA v2 download laid out as in
`gridvqa.data.layout`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gridvqa.data import layout
from gridvqa.data.jsonio import atomic_write_json, load_json
from gridvqa.errors import DataError
from gridvqa.metrics.vqa_eval import normalize_answer

# Count of matching human answers -> soft target (bottom-up-attention / MCAN convention).
SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)
ANSWER_TYPES = ("yes/no", "number", "other")


def soft_score(count: int) -> float:
    """0/1/2/3/>=4 matching human answers -> 0, 0.3, 0.6, 0.9, 1.0."""
    return SOFT_SCORES[min(int(count), 4)]


@dataclass
class VQAEntry:
    question_id: int
    image_id: int
    question: str
    answers: list[str] = field(default_factory=list)  # the raw human answers (10 in VQA v2); empty on test
    answer_type: str | None = None
    question_type: str | None = None
    multiple_choice_answer: str | None = None
    split: str | None = None  # the split it was read from: where its image lives when splits are mixed

    @property
    def normalized_answers(self) -> list[str]:
        return [normalize_answer(a) for a in self.answers]


def _require(obj: dict, key: str, path: Path, where: str) -> object:
    if key not in obj:
        raise DataError(f"{path}: {where} has no {key!r} field")
    return obj[key]


def read_questions(path: str | os.PathLike) -> list[dict]:
    """The `questions` list of an official questions file, each checked for its three fields."""
    p = Path(path)
    data = load_json(p, "VQA questions file")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise DataError(f"{p}: not a VQA questions file (expected an object with a 'questions' list)")
    for i, q in enumerate(data["questions"]):
        for key in ("image_id", "question", "question_id"):
            _require(q, key, p, f"question #{i}")
    return data["questions"]


def read_annotations(path: str | os.PathLike) -> list[dict]:
    """The `annotations` list of an official annotations file, each checked for its answers."""
    p = Path(path)
    data = load_json(p, "VQA annotations file")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{p}: not a VQA annotations file (expected an object with an 'annotations' list)")
    for i, a in enumerate(data["annotations"]):
        for key in ("question_id", "image_id", "answers"):
            _require(a, key, p, f"annotation #{i}")
    return data["annotations"]


def load_entries(
    questions: str | os.PathLike, annotations: str | os.PathLike | None = None
) -> list[VQAEntry]:
    """Join a questions file with its annotations file (None for test splits)."""
    qs = read_questions(questions)
    by_qid: dict[int, dict] = {}
    if annotations is not None:
        for a in read_annotations(annotations):
            by_qid[int(a["question_id"])] = a
    entries = []
    missing = []
    for q in qs:
        qid = int(q["question_id"])
        e = VQAEntry(question_id=qid, image_id=int(q["image_id"]), question=str(q["question"]))
        if annotations is not None:
            a = by_qid.get(qid)
            if a is None:
                missing.append(qid)
                continue
            e.answers = [str(x["answer"]) for x in a["answers"]]
            e.answer_type = a.get("answer_type")
            e.question_type = a.get("question_type")
            e.multiple_choice_answer = a.get("multiple_choice_answer")
        entries.append(e)
    if missing:
        raise DataError(
            f"{annotations}: {len(missing)} question(s) of {questions} have no annotation "
            f"(first ids: {missing[:5]})"
        )
    return entries


def has_annotations(root: str | os.PathLike, split: str) -> bool:
    return layout.annotations_path(root, split).is_file()


def load_split(root: str | os.PathLike, split: str, with_answers: bool | None = None) -> list[VQAEntry]:
    """Entries of one split under a data root; `with_answers=None` reads annotations when present."""
    qpath = layout.questions_path(root, split)
    apath = layout.annotations_path(root, split)
    if with_answers is None:
        with_answers = apath.is_file()
    if with_answers and not apath.is_file():
        raise DataError(f"{apath}: VQA annotations file not found (split {split!r} needs answers)")
    entries = load_entries(qpath, apath if with_answers else None)
    for e in entries:
        e.split = split
    return entries


def split_names(splits: str | Sequence[str]) -> tuple[str, ...]:
    """`"train"` or `["train", "val", "vg"]` (also `"train+val"`, mcan-vqa's spelling) -> a tuple of
    split names, each checked against the known splits."""
    parts = splits.split("+") if isinstance(splits, str) else [str(s) for s in splits]
    names = tuple(p.strip() for p in parts)
    if not names or any(not n for n in names):
        raise DataError(f"no split named in {splits!r}")
    for n in names:
        try:
            layout.official_split(n)
        except ValueError as e:
            raise DataError(str(e)) from None
    if len({layout.official_split(n) for n in names}) != len(names):
        raise DataError(f"split {splits!r} names a split twice")
    return names


def load_splits(
    root: str | os.PathLike, splits: str | Sequence[str], with_answers: bool | None = None
) -> list[VQAEntry]:
    """The entries of one or several splits, in order; a question id seen twice is an error (the
    splits overlap, e.g. test and test-dev)."""
    entries: list[VQAEntry] = []
    seen: dict[int, str] = {}
    for split in split_names(splits):
        for e in load_split(root, split, with_answers):
            if e.question_id in seen:
                raise DataError(
                    f"{layout.questions_path(root, split)}: question {e.question_id} is also in split "
                    f"{seen[e.question_id]!r}: the splits overlap"
                )
            seen[e.question_id] = split
            entries.append(e)
    return entries


def present_question_splits(root: str | os.PathLike) -> tuple[str, ...]:
    """The splits of `layout.QUESTION_SPLITS` whose questions file exists under `root`."""
    return tuple(s for s in layout.QUESTION_SPLITS if layout.questions_path(root, s).is_file())


class AnswerVocab:
    """The answer classes: normalised answers seen at least `min_count` times (3,129 on VQA v2)."""

    def __init__(self, answers: Sequence[str], min_count: int | None = None) -> None:
        self.answers = list(answers)
        self.min_count = min_count
        self.index = {a: i for i, a in enumerate(self.answers)}
        if len(self.index) != len(self.answers):
            raise ValueError("answer vocabulary has duplicates")

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: str) -> bool:
        return answer in self.index

    @classmethod
    def build(cls, entries: Iterable[VQAEntry], min_count: int = 9) -> AnswerVocab:
        """Count the normalised `multiple_choice_answer` (as the standard list); ties break alphabetically."""
        counts: Counter[str] = Counter()
        for e in entries:
            mc = e.multiple_choice_answer
            if mc is None and e.answers:
                mc = Counter(e.normalized_answers).most_common(1)[0][0]
            if mc is not None:
                counts[normalize_answer(mc)] += 1
        kept = sorted((a for a, c in counts.items() if c >= min_count and a), key=lambda a: (-counts[a], a))
        if not kept:
            raise DataError(f"no answer occurs at least {min_count} times: lower min_count")
        return cls(kept, min_count)

    def targets(self, human_answers: Sequence[str]) -> dict[int, float]:
        """Sparse soft target {answer index: score} from the raw human answers."""
        counts = Counter(normalize_answer(a) for a in human_answers)
        return {self.index[a]: soft_score(c) for a, c in counts.items() if a in self.index}

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, {"answers": self.answers, "min_count": self.min_count}, indent=0)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AnswerVocab:
        data = load_json(path, "answer vocabulary (make it with: python -m gridvqa.data.prepare DATA_ROOT)")
        if not isinstance(data, dict) or not isinstance(data.get("answers"), list):
            raise DataError(f"{path}: not an answer vocabulary (expected {{'answers': [...]}})")
        answers = data["answers"]
        # A non-string would be coerced into a class named "None" or "1"; say which entry instead.
        seen: dict[str, int] = {}
        for i, a in enumerate(answers):
            if not isinstance(a, str) or not a:
                what = "an empty string" if a == "" else f"{a!r} ({type(a).__name__})"
                raise DataError(f"{path}: answer #{i} is {what}; every answer must be a non-empty string")
            if a in seen:
                msg = f"{path}: answer #{i} {a!r} repeats answer #{seen[a]}; answers must be unique"
                raise DataError(msg)
            seen[a] = i
        return cls(answers, data.get("min_count"))

    def coverage(self, entries: Iterable[VQAEntry]) -> float:
        """Share of human answers (normalised) that are in the vocabulary."""
        total = inside = 0
        for e in entries:
            for a in e.normalized_answers:
                total += 1
                inside += a in self.index
        return inside / total if total else 0.0
