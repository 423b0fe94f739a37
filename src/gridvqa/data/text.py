"""Question tokenizer: a word-level `tokenizers` model used through transformers' PreTrainedTokenizerFast.

Built from the training questions with MCAN's cleaning (lower case, punctuation dropped, '-' and '/'
split) and saved next to the data, so a checkpoint can carry it and any user can reload it with
`AutoTokenizer.from_pretrained(dir)`. A local pretrained tokenizer directory may be used instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from gridvqa.errors import DataError

PAD, UNK = "[PAD]", "[UNK]"
MAX_LENGTH = 14
# MCAN's question cleaning: these characters are deleted, '-' and '/' become spaces.
_DROP = r"[.,'!?\"()*#:;]"
_SPLIT = r"[-/]"


def _word_level_tokenizer(vocab: dict[str, int]):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Lowercase(),
            normalizers.Replace(Regex(_DROP), ""),
            normalizers.Replace(Regex(_SPLIT), " "),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def build_vocab(questions: Iterable[str], min_count: int = 1) -> dict[str, int]:
    """Word -> id, PAD = 0 and UNK = 1, words ordered by frequency then alphabetically."""
    from collections import Counter

    empty = _word_level_tokenizer({PAD: 0, UNK: 1})
    counts: Counter[str] = Counter()
    for q in questions:
        norm = empty.normalizer.normalize_str(q)
        counts.update(w for w, _ in empty.pre_tokenizer.pre_tokenize_str(norm))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    vocab = {PAD: 0, UNK: 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    return vocab


def build_tokenizer(questions: Iterable[str], max_length: int = MAX_LENGTH, min_count: int = 1):
    """A PreTrainedTokenizerFast over the words of `questions`."""
    from transformers import PreTrainedTokenizerFast

    tok = _word_level_tokenizer(build_vocab(questions, min_count))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, model_max_length=max_length, padding_side="right"
    )


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(d))
    return d


def read_tokenizer_json(path: str | os.PathLike) -> str:
    """The text of a tokenizer.json, checked to be UTF-8 JSON; a DataError naming the file otherwise
    (never echoing its bytes)."""
    import json

    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start}); expected the tokenizer.json that "
                        "python -m gridvqa.data.prepare writes") from None
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not JSON (line {e.lineno}, column {e.colno}: {e.msg}); expected the "
                        "tokenizer.json that python -m gridvqa.data.prepare writes") from None
    return text


def load_tokenizer(directory: str | os.PathLike, max_length: int | None = None):
    """Load our saved tokenizer or any local pretrained tokenizer directory (never the network)."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(
            f"{d}: tokenizer directory not found (make it with: python -m gridvqa.data.prepare DATA_ROOT)"
        )
    if (d / "tokenizer.json").is_file():
        read_tokenizer_json(d / "tokenizer.json")  # a damaged file named in one line, not its bytes
    from transformers import AutoTokenizer

    try:  # trust_remote_code=False: a folder that ships its own tokenizer code is refused, never run
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{d}: not a tokenizer directory ({str(e).splitlines()[0]})") from None
    if max_length is not None:
        tok.model_max_length = max_length
    return tok


def encode(tokenizer, questions: Sequence[str], max_length: int = MAX_LENGTH) -> tuple:
    """(input_ids [B, max_length] int64, mask [B, max_length] bool): truncated and padded to max_length."""
    enc = tokenizer(
        list(questions),
        max_length=max_length,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
        return_attention_mask=True,
        add_special_tokens=False,
    )
    return enc["input_ids"], enc["attention_mask"].bool()
