"""Answers from a trained VQA checkpoint: load it safely, answer a whole split, answer one image+question.

The logic behind `python -m gridvqa.evaluate` and `python -m gridvqa.predict`. A checkpoint is
self-contained (answers, tokenizer and image settings are VQAModule hyper-parameters), so loading needs
neither the data folder nor the training config.

Checkpoints are read with `torch.load(weights_only=True)`. VQAModule saves plain containers; a checkpoint
whose hyper-parameters hold Hydra's omegaconf containers is read too: only those container classes (plain
data holders) are added to the weights-only allow-list, and they become plain dicts/lists right after loading.
"""

from __future__ import annotations

import inspect
import json
import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gridvqa.config import to_plain
from gridvqa.data import layout
from gridvqa.devices import resolve_device
from gridvqa.errors import ConfigError, DataError
from gridvqa.metrics.vqa_eval import RESULTS_NAME, accuracy_path

if TYPE_CHECKING:
    from PIL import Image

    from gridvqa.data.images import ImagePipeline
    from gridvqa.lit.vqa_module import VQAModule

log = logging.getLogger(__name__)

TRAIN_HINT = "python -m gridvqa.train experiment=e2e"
SPLITS = ("train", "val", "test", "test-dev")
DEFAULT_MAX_LENGTH = 14
DEFAULT_SIZE_DIVISIBILITY = 32


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def _omegaconf_safe_globals() -> list[Any]:
    """The classes a pickled DictConfig/ListConfig is made of: data holders whose __setstate__ only sets
    attributes. Found by loading a checkpoint of `python -m gridvqa.train` until nothing was refused."""
    import collections
    import typing

    from omegaconf import DictConfig, ListConfig, nodes
    from omegaconf.base import ContainerMetadata, Metadata

    node_types = [getattr(nodes, n) for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode",
                                              "BooleanNode", "BytesNode", "PathNode") if hasattr(nodes, n)]
    return [DictConfig, ListConfig, ContainerMetadata, Metadata, *node_types, typing.Any,
            collections.defaultdict, dict, list, tuple, int, float, str, bool, bytes]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning VQA checkpoint as a dict, read without running code from the file; hyper-parameters
    come back as plain dicts. Raises ConfigError (missing file) or DataError (unreadable / refused)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: checkpoint not found (train one with: {TRAIN_HINT})")
    try:
        with torch.serialization.safe_globals(_omegaconf_safe_globals()):
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((ln.strip() for ln in str(e).splitlines() if "global" in ln.lower()), "")
        reason = reason or "not a checkpoint"
        raise DataError(f"{p}: refused by torch's weights-only loader ({reason})") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{p}: not a readable torch checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise DataError(f"{p}: not a Lightning checkpoint (no 'state_dict')")
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        if key in ckpt:
            ckpt[key] = to_plain(ckpt[key])
    return ckpt


def load_model(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> VQAModule:
    """Rebuild the VQAModule of a checkpoint from the checkpoint alone, in eval mode."""
    p = Path(ckpt_path)
    ckpt = load_checkpoint(p)  # first: a missing file is reported before Lightning is imported
    from gridvqa.lit.vqa_module import VQAModule, head_hparams_from_checkpoint

    hp = dict(ckpt.get("hyper_parameters") or {})
    if not hp.get("answers") or not hp.get("tokenizer_json"):
        raise DataError(f"{p}: not a gridvqa VQA checkpoint (its hyper-parameters lack answers / tokenizer)")
    accepted = set(inspect.signature(VQAModule.__init__).parameters) - {"self", "init_from"}
    ignored = sorted(set(hp) - accepted)
    if ignored:
        log.info("%s: ignoring hyper-parameters this VQAModule does not take: %s", p, ignored)
    kwargs = {k: v for k, v in hp.items() if k in accepted}
    # The state dict holds every weight: files named at training time (backbone, GloVe) are not needed.
    if kwargs.get("backbone"):
        kwargs["backbone"] = {**kwargs["backbone"], "weights": None}
    kwargs["head"] = {**head_hparams_from_checkpoint(kwargs.get("head")), "glove_path": None}
    dm = ckpt.get("datamodule_hyper_parameters") or {}
    if kwargs.get("image") is None and dm:
        kwargs["image"] = {"size": dm.get("image_size"), "short": dm.get("short"),
                           "max_size": dm.get("max_size"), "norm": dm.get("norm"),
                           "mean": dm.get("pixel_mean"), "std": dm.get("pixel_std")}
    try:
        module = VQAModule(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{p}: cannot rebuild the model: {e}") from None
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("val_acc.")}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f"{p}: weights do not fit the model its hyper-parameters describe "
                        f"(missing {_few(missing)}; unexpected {_few(unexpected)})")
    module.question_max_length = int(dm.get("max_length") or DEFAULT_MAX_LENGTH)
    module.size_divisibility = int(dm.get("size_divisibility") or DEFAULT_SIZE_DIVISIBILITY)
    return module.to(map_location).eval()


def _few(keys: Sequence[str], k: int = 3) -> str:
    keys = list(keys)
    if not keys:
        return "none"
    return ", ".join(keys[:k]) + (f" and {len(keys) - k} more" if len(keys) > k else "")


def _as_module(ckpt_or_module: str | Path | VQAModule) -> VQAModule:
    if isinstance(ckpt_or_module, (str, Path)):
        return load_model(ckpt_or_module)
    return ckpt_or_module


def batch_to(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on `device` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class EvalMode:
    """Eval mode and no autograd for the duration; a module given by the caller gets its mode back."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.was_training = module, module.training
        self.no_grad = torch.inference_mode()

    def __enter__(self) -> None:
        self.module.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.no_grad.__exit__(*exc)
        self.module.train(self.was_training)


def image_pipeline(module: VQAModule) -> ImagePipeline:
    """The evaluation image pipeline the checkpoint was trained with (no flips): its resize rule and the
    pixel normalisation of its backbone weights, stored in the checkpoint."""
    from gridvqa.data.images import build_image_pipeline

    img = module.hparams.get("image")
    if not img:
        raise ConfigError("the model has no image settings (hyper-parameter `image`); cannot prepare pixels")
    return build_image_pipeline({**img, "hflip": 0.0}, prefix="model.image.")


# ---------------------------------------------------------------------------------------------------
# One image and one question


def predict(
    ckpt_or_module: str | Path | VQAModule,
    image: str | Path | Image.Image,
    question: str,
    topk: int = 5,
    device: str | torch.device | None = None,
) -> list[tuple[str, float]]:
    """The `topk` most likely answers with their sigmoid probabilities, highest first.

    Needs a `source=pixels` model (the backbone is part of it); models trained on stored HDF5 features
    cannot see a new image. `device` moves the model there (default: a loaded checkpoint stays on cpu,
    a module where it is).
    """
    from gridvqa.single_question import check_question, question_batch, read_picture, top_answers

    check_question(question, topk)
    picture = read_picture(image)  # before the slow model load
    module = _as_module(ckpt_or_module)
    if device is not None:
        module = module.to(resolve_device(device))
    source = module.hparams.source
    if source != "pixels":
        raise ConfigError(
            f"this checkpoint reads pre-extracted {source} features: prediction from an image needs a "
            f"source=pixels model (e.g. {TRAIN_HINT}), or extract the image's features first"
        )
    inputs = question_batch(module, question, picture)
    with EvalMode(module):
        logits = module(inputs.batch)
    return top_answers(module, logits[0], topk)


# ---------------------------------------------------------------------------------------------------
# A whole split


def check_split(split: str) -> str:
    """The official name of a split (`val` -> `val2014`); a ConfigError naming the valid ones."""
    try:
        return layout.official_split(str(split))
    except ValueError:
        valid = ", ".join(SPLITS) + " (or " + ", ".join(sorted(set(layout.SPLIT_ALIASES) - set(SPLITS))) + ")"
        raise ConfigError(f"split={split!r} is not a VQA split; expected one of: {valid}") from None


def _check_root(data_root: str | Path) -> Path:
    root = Path(data_root)
    if not root.is_dir():
        raise ConfigError(f"{root}: data root not found (set paths.data_root=DIR or $GRIDVQA_DATA)")
    return root


def answer_split(
    module: VQAModule,
    data_root: str | Path,
    split: str,
    features: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    owner: str | Path = "the checkpoint",
) -> tuple[list[dict[str, Any]], int]:
    """The model's answer to every question of a split, in the question file's order, and how many of
    them were answered without their image (unreadable files, or images missing from the feature file):
    those get the most frequent training answer so the result file still covers the split. `owner` names
    the model in errors (its checkpoint path)."""
    from functools import partial

    from torch.utils.data import DataLoader

    from gridvqa.data.text import encode
    from gridvqa.data.vqa2 import AnswerVocab, load_split
    from gridvqa.data.vqa_data import VQADataset, collate_vqa

    check_split(split)
    root = _check_root(data_root)
    source = module.hparams.source
    entries = load_split(root, split)
    if not entries:
        raise DataError(f"{layout.questions_path(root, split)}: no questions")
    max_length = getattr(module, "question_max_length", DEFAULT_MAX_LENGTH)
    # The checkpoint's own tokenizer and answers, not the data folder's: they define the model's inputs.
    q_ids, q_mask = encode(module.tokenizer, [e.question for e in entries], max_length=max_length)
    pipeline = store = None
    if source == "pixels":
        pipeline = image_pipeline(module)
    else:
        features = layout.split_features(features, root, source, split, owner)
        from gridvqa.data.features import open_features

        store = open_features(features)
    ds = VQADataset(entries, q_ids, q_mask, AnswerVocab(module.answers), split, root, source, pipeline, store,
                    group_by_image=True)
    size_div = getattr(module, "size_divisibility", DEFAULT_SIZE_DIVISIBILITY)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=partial(collate_vqa, size_divisibility=size_div))
    device = next(module.parameters()).device
    answers: dict[int, str] = {}
    with EvalMode(module):
        for batch in loader:
            if batch is None:
                continue
            logits = module(batch_to(batch, device))
            for qid, ans in zip(batch["question_id"].tolist(), module.predict_answers(logits), strict=True):
                answers[qid] = ans
    blind = [e.question_id for e in entries if e.question_id not in answers]
    if blind:
        # AnswerVocab orders answers by training frequency, so answers[0] is the blind prior's answer.
        log.warning("%d question(s) answered %r without their image (unreadable or missing): e.g. %s",
                    len(blind), module.answers[0], blind[:5])
    return [{"question_id": e.question_id, "answer": answers.get(e.question_id, module.answers[0])}
            for e in entries], len(blind)


# EvalAI's VQA v2 "Test-Dev" phase takes a results file of the full test set's form: an answer for every
# test2015 question, of which it scores the test-dev ones. The VQA Challenge guidelines
# (visualqa.org/challenge.html) call the Test-Dev submission procedure "identical to the full test set
# submission procedure"; mcan-vqa (README, "Online Evaluation") uploads one test2015 results file to both
# phases; a file lacking ids is refused with "Results do not correspond to current VQA set" (the VQA API's
# loadRes check, seen on EvalAI in MILVLG/mcan-vqa issue #28). Entry form, visualqa.org/evaluation.html:
# [{"question_id": int, "answer": str}].
TEST_DEV, TEST_STD = "test-dev2015", "test2015"


def _test_set_questions(data_root: str | Path) -> Path:
    qpath = layout.questions_path(data_root, TEST_STD)
    if not qpath.is_file():
        raise DataError(
            f"{qpath}: not found; EvalAI's Test-Dev phase takes an answer for every {TEST_STD} question "
            "(it scores the test-dev ones): put the test2015 questions file there"
        )
    return qpath


def cover_test_set(
    results: Sequence[dict[str, Any]], data_root: str | Path, filler: str
) -> tuple[list[dict[str, Any]], int]:
    """Test-dev answers extended to every test2015 question, in the test2015 file's order, as EvalAI's
    Test-Dev phase requires; the questions outside test-dev (not scored there) get `filler`. Returns the
    results and how many were filled."""
    from gridvqa.data.vqa2 import read_questions

    qpath = _test_set_questions(data_root)
    answers = {int(r["question_id"]): r["answer"] for r in results}
    test_ids = [int(q["question_id"]) for q in read_questions(qpath)]
    stray = answers.keys() - set(test_ids)
    if stray:
        raise DataError(f"{qpath}: {len(stray)} test-dev question(s) are not test2015 questions (e.g. "
                        f"{sorted(stray)[:3]}): the two files do not belong together")
    covered = [{"question_id": q, "answer": answers.get(q, filler)} for q in test_ids]
    return covered, len(test_ids) - len(answers)


@dataclass
class SplitEvaluation:
    split: str  # official name, e.g. val2014
    results_path: Path
    num_questions: int
    answered_blind: int
    scores: dict[str, Any] | None  # the official scorer's output; None without annotations (test splits)
    annotations_path: Path
    filled: int = 0  # test-dev: test2015 questions outside test-dev, answered `filler` (not scored there)
    filler: str | None = None
    write_error: str | None = None  # why the results file could not be written (the scores still count)
    accuracy_path: Path | None = None  # the scores as a file (scored splits)

    def summary(self) -> str:
        if self.scores is not None:
            return json.dumps(self.scores)
        if self.split == TEST_DEV:
            return (f"wrote {self.num_questions} answers to {self.results_path}: every {TEST_STD} question, "
                    f"as EvalAI's Test-Dev phase takes them; the model answered the "
                    f"{self.num_questions - self.filled} of {TEST_DEV}, the other {self.filled} got "
                    f"{self.filler!r} (not scored in that phase; for Test-Standard use split=test)")
        return (f"wrote {self.num_questions} answers (every question of {self.split}) to "
                f"{self.results_path}; not scored: no annotations at {self.annotations_path} "
                "(submit the file to EvalAI)")


def evaluate_split(
    ckpt_or_module: str | Path | VQAModule,
    data_root: str | Path,
    split: str = "val",
    out: str | Path | None = None,
    output_dir: str | Path | None = None,
    features: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device | None = None,
) -> SplitEvaluation:
    """Answer every question of `split`, write the results file (`out`, else the official name under
    `output_dir`, else the working directory) and score it with the official scorer when the split has
    annotations. For test-dev the file covers every test2015 question (see `cover_test_set`)."""
    from gridvqa.config_checks import check_writable
    from gridvqa.metrics import vqa_eval

    official = check_split(split)
    _check_root(data_root)  # the cheap checks before the slow model load
    path = Path(out) if out else Path(output_dir or ".") / RESULTS_NAME.format(split=official)
    check_writable(path, "out")
    if official == TEST_DEV:
        _test_set_questions(data_root)
    module = _as_module(ckpt_or_module)
    if device is not None:
        module = module.to(resolve_device(device))
    owner = ckpt_or_module if isinstance(ckpt_or_module, str | Path) else "the checkpoint"
    results, blind = answer_split(module, data_root, split, features, batch_size, num_workers, owner)
    filled = 0
    if official == TEST_DEV:
        results, filled = cover_test_set(results, data_root, module.answers[0])
    ann = layout.annotations_path(data_root, split)
    scores = None
    if ann.is_file():  # scored from the answers in memory: a failed write does not lose the score
        scores = vqa_eval.evaluate(layout.questions_path(data_root, split), ann, results)
    scores_path, write_error = _write_files(path, results, scores)
    return SplitEvaluation(official, path, len(results), blind, scores, ann, filled, module.answers[0],
                           write_error, scores_path)


def _write_files(
    path: Path, results: Sequence[Mapping[str, Any]], scores: dict[str, Any] | None
) -> tuple[Path | None, str | None]:
    """Writes the results file, then (scored splits) the accuracy file beside it; returns (the accuracy
    file, why a file was not written)."""
    from gridvqa.data.jsonio import atomic_write_json
    from gridvqa.metrics import vqa_eval

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        vqa_eval.write_results(path, results)
    except OSError as e:
        return None, f"{path}: results file not written ({e.strerror or e})"
    if scores is None:
        return None, None
    scores_path = accuracy_path(path)
    try:
        atomic_write_json(scores_path, scores, indent=1)
    except OSError as e:
        return None, f"{scores_path}: scores file not written ({e.strerror or e})"
    return scores_path, None
