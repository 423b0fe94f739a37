"""Question encoders for the VQA head: both return (token features [B, T, H], mask [B, T], True = valid).

- `LSTMTextEncoder`: MCAN's word embeddings (300-d, optionally initialised from a local GloVe-format
  text file: `model.head.glove_path`; VQAModule hands the tokenizer's vocabulary over) followed by a
  single-layer LSTM to the head's hidden size.
- `HFTextEncoder`: any local transformers encoder directory plus a linear projection to hidden.
  transformers is imported only when this branch is built.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from gridvqa.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def _is_header(parts: list[str]) -> bool:
    # word2vec text files start with "<count> <dim>"; GloVe files do not.
    return len(parts) == 2 and all(p.isdigit() for p in parts)


def read_glove(path: str | os.PathLike, words: Mapping[str, int], dim: int) -> dict[str, torch.Tensor]:
    """Vectors of the `words` present in a GloVe-format text file (`word v1 ... v_dim` per line).

    Exact matches win; a word found only in another case (GloVe 840B is cased) takes the first
    case-insensitive match. Lines of other words are skipped without parsing their numbers, so a
    multi-GB file is read in one pass at I/O speed. Bad lines for wanted words raise a one-line DataError.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: GloVe vectors file not found")
    lower = {w.lower(): w for w in reversed(list(words))}  # reversed: the first vocab spelling wins
    found: dict[str, torch.Tensor] = {}
    exact: set[str] = set()
    checked = False
    with p.open("r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            head, _, rest = line.rstrip("\n").partition(" ")
            if lineno == 1 and _is_header(line.split()):
                continue
            if not checked:  # the first vector line tells the file's width: say so if it is not ours
                checked = True
                width = rest.count(" ") + 1
                if width != dim:
                    raise DataError(f"{p}: line {lineno}: {width}-d vectors, but the embedding is {dim}-d")
            key = head if head in words else lower.get(head.lower())
            if key is None or key in exact or (key in found and head != key):
                # Some GloVe tokens hold spaces ("a b 0.1 ..."): only the rare lines whose first piece
                # is a wanted word pay for the full split below.
                continue
            parts = rest.split(" ")
            if len(parts) > dim:  # a token with spaces whose first piece happens to be a vocab word
                continue
            if len(parts) < dim:
                n = len(parts)
                raise DataError(f"{p}: line {lineno}: expected {dim} numbers after {head!r}, found {n}")
            try:
                vec = torch.tensor([float(x) for x in parts], dtype=torch.float32)
            except ValueError:
                raise DataError(f"{p}: line {lineno}: non-numeric vector value for {head!r}") from None
            found[key] = vec
            if head == key:
                exact.add(key)
    return found


def init_embedding_from_glove(
    embedding: nn.Embedding, path: str | os.PathLike, vocab: Mapping[str, int]
) -> int:
    """Copy GloVe vectors into the rows of `embedding` named by `vocab` (word -> id); returns how many.

    Rows of words not in the file keep their random initialisation; the padding row stays zero.
    """
    dim = embedding.embedding_dim
    bad = [w for w, i in vocab.items() if not 0 <= i < embedding.num_embeddings]
    if bad:
        raise ConfigError(
            f"{path}: vocabulary ids out of range for an embedding of {embedding.num_embeddings} rows "
            f"(e.g. {bad[0]!r} -> {vocab[bad[0]]})"
        )
    vectors = read_glove(path, vocab, dim)
    with torch.no_grad():
        for word, vec in vectors.items():
            embedding.weight[vocab[word]] = vec
        if embedding.padding_idx is not None:
            embedding.weight[embedding.padding_idx].zero_()
    log.info("GloVe %s: found %d of %d vocabulary words", path, len(vectors), len(vocab))
    return len(vectors)


class LSTMTextEncoder(nn.Module):
    """Word embedding (+ optional GloVe init) and a 1-layer LSTM, as in MCAN.

    The LSTM runs over the padded sequence without packing, like MCAN: with right padding (our
    tokenizer's) the outputs at valid positions never see the padding, and no lengths need to go to CPU.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        word_dim: int = 300,
        pad_id: int = 0,
        glove_path: str | os.PathLike | None = None,
        vocab: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        if vocab_size <= 0:
            raise ConfigError(f"LSTM question encoder needs vocab_size > 0, got {vocab_size}")
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(word_dim, hidden, num_layers=1, batch_first=True)
        self.glove_found: int | None = None
        if glove_path is not None:
            if not Path(glove_path).is_file():
                raise ConfigError(
                    f"{glove_path}: GloVe vectors file not found (model.head.glove_path: a local text "
                    f"file, a word and {word_dim} numbers a line, e.g. glove.840B.300d.txt; null: no GloVe)"
                )
            if vocab is None:
                raise ConfigError(f"{glove_path}: GloVe init needs the tokenizer vocabulary (word -> id)")
            self.glove_found = init_embedding_from_glove(self.embed, glove_path, vocab)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            mask = tokens != self.pad_id
        # CPU autocast sends the LSTM to a bfloat16 oneDNN kernel many CPUs lack; it is cheap in float32
        with torch.autocast(tokens.device.type, enabled=False):
            feats, _ = self.lstm(self.embed(tokens).float())
        return feats, mask.bool()


class HFTextEncoder(nn.Module):
    """A local transformers encoder (never downloaded) and a linear projection to the head's width."""

    def __init__(self, model_path: str | os.PathLike, hidden: int, freeze: bool = False) -> None:
        super().__init__()
        p = Path(model_path)
        if not p.is_dir():
            raise ConfigError(f"{p}: transformers text encoder directory not found (local paths only)")
        from transformers import AutoModel  # heavy: only when this branch is used

        try:  # trust_remote_code=False: a folder that ships its own model code is refused, never run or asked
            self.model = AutoModel.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{p}: cannot load a transformers model: {msg}") from None
        self.proj = nn.Linear(self.model.config.hidden_size, hidden)
        self.freeze = freeze
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> HFTextEncoder:
        super().train(mode)
        if self.freeze:
            self.model.eval()  # a frozen encoder keeps its dropout off
        return self

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            mask = torch.ones_like(tokens, dtype=torch.bool)
        out = self.model(input_ids=tokens, attention_mask=mask.long())
        return self.proj(out.last_hidden_state), mask.bool()


def build_text_encoder(
    kind: str,
    hidden: int,
    *,
    vocab_size: int = 0,
    word_dim: int = 300,
    pad_id: int = 0,
    glove_path: str | os.PathLike | None = None,
    vocab: Mapping[str, int] | None = None,
    model_path: str | os.PathLike | None = None,
    freeze: bool = False,
) -> nn.Module:
    """`kind` = "lstm" (MCAN) or "hf" (local transformers directory at `model_path`)."""
    if kind == "lstm":
        return LSTMTextEncoder(vocab_size, hidden, word_dim, pad_id, glove_path, vocab)
    if kind == "hf":
        if model_path is None:
            raise ConfigError("text_encoder=hf needs text_model_path (a local transformers directory)")
        return HFTextEncoder(model_path, hidden, freeze)
    raise ConfigError(f"unknown text encoder {kind!r} (expected 'lstm' or 'hf')")
