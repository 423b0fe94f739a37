"""The VQA v2 recipe on the built-in data: GloVe word vectors through the real configs, joined training
splits (train + val + VG-QA, as MCAN trains for test-dev) and a Test-Dev results file EvalAI accepts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from ckpt_utils import TINY_PIXELS, region_checkpoint, train_pixels_checkpoint, write_region_features
from feature_files import write_features
from gridvqa.data import layout
from gridvqa.data.text import load_tokenizer
from gridvqa.data.vqa2 import load_split, read_questions
from gridvqa.data.vqa_data import ChainedFeatures, split_features
from gridvqa.errors import ConfigError, DataError, find_user_error
from gridvqa.inference import answer_split, evaluate_split, load_model
from gridvqa.models.mcan import mcan_config
from hydra_utils import compose_cfg

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture
def shapes_copy(tiny_shapes, tmp_path):
    """A private copy of the tiny built-in set, for tests that add files to it."""
    root = tmp_path / "data"
    shutil.copytree(tiny_shapes, root, ignore=shutil.ignore_patterns("features"))
    return root


# -- GloVe -----------------------------------------------------------------------------------------


def _write_glove(path: Path, words: list[str], dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = {w: rng.standard_normal(dim).astype(np.float32) for w in words}
    lines = [" ".join(["zzzunused", *(["0.5"] * dim)])]
    lines += [" ".join([w.capitalize() if k == 0 else w, *(f"{x:.6f}" for x in v)])  # cased forms match too
              for k, (w, v) in enumerate(vectors.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {w: np.array([float(f"{x:.6f}") for x in v], dtype=np.float32) for w, v in vectors.items()}


def test_glove_path_initialises_the_word_embeddings_through_the_configs(tiny_shapes, tmp_path):
    vocab = load_tokenizer(layout.tokenizer_dir(tiny_shapes)).get_vocab()
    words = [w for w in ("what", "color", "circle", "how", "many") if w in vocab]
    assert len(words) >= 3
    glove = tmp_path / "glove.txt"
    dim = mcan_config("tiny").word_dim  # 300, as MCAN's
    vectors = _write_glove(glove, words, dim)

    cfg = compose_cfg([*TINY_PIXELS, "data.image_size=[64,64]", f"model.head.glove_path={glove}"],
                      tiny_shapes, tmp_path / "run")
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    emb = model.head.text.embed.weight.detach()
    assert model.head.text.glove_found == len(words)
    for w, v in vectors.items():
        assert torch.equal(emb[vocab[w]], torch.from_numpy(v)), w
    assert (emb[vocab["[PAD]"]] == 0).all()
    other = [i for w, i in vocab.items() if w not in vectors and w != "[PAD]"]
    assert not any(torch.equal(emb[i], emb[vocab[words[0]]]) for i in other)  # the rest keep their init


def test_glove_checkpoint_loads_without_the_glove_file(tiny_shapes, tmp_path):
    """Trained and saved, the checkpoint holds the vectors itself: loading it needs no GloVe file."""
    vocab = load_tokenizer(layout.tokenizer_dir(tiny_shapes)).get_vocab()
    glove = tmp_path / "glove.txt"
    words = [w for w in ("what", "color") if w in vocab]
    _write_glove(glove, words, mcan_config("tiny").word_dim)
    ckpt, trained = train_pixels_checkpoint(
        tiny_shapes, tmp_path, ("data.image_size=[64,64]", f"model.head.glove_path={glove}"))
    assert trained.head.text.glove_found == len(words)
    glove.unlink()
    loaded = load_model(ckpt)
    assert torch.equal(loaded.head.text.embed.weight, trained.head.text.embed.weight)


def test_missing_glove_file_is_one_line_naming_path_and_key(tiny_shapes, tmp_path):
    missing = tmp_path / "glove" / "glove.840B.300d.txt"
    cfg = compose_cfg([*TINY_PIXELS, f"model.head.glove_path={missing}"], tiny_shapes, tmp_path / "run")
    with pytest.raises(Exception) as ei:
        instantiate(cfg.model)
    err = find_user_error(ei.value)
    assert isinstance(err, ConfigError)
    msg = str(err)
    assert msg.startswith(f"{missing}: GloVe vectors file not found") and "model.head.glove_path" in msg
    assert "\n" not in msg


def test_paper_files_name_the_glove_file(tiny_shapes):
    from hydra_utils import EXPERIMENTS

    for name in [n for n in EXPERIMENTS if n.startswith("paper_")]:
        cfg = compose_cfg([f"experiment={name}"], tiny_shapes)
        assert cfg.model.head.glove_path == f"{tiny_shapes}/glove/glove.840B.300d.txt", name


# -- joined training splits ------------------------------------------------------------------------


def _write_vg_qa(root: Path, image_ids: list[int]) -> list[int]:
    """VG-QA in mcan-vqa's VQA-format files: questions about COCO images under their COCO ids."""
    qids = [900_000 + k for k in range(len(image_ids))]
    qs = [{"image_id": i, "question": "What color is the circle?", "question_id": q}
          for q, i in zip(qids, image_ids, strict=True)]
    anns = [{"question_id": q, "image_id": i, "answer_type": "other", "question_type": "what color is",
             "multiple_choice_answer": "red",
             "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)]}
            for q, i in zip(qids, image_ids, strict=True)]
    layout.questions_path(root, "vg").write_text(json.dumps({"questions": qs}))
    layout.annotations_path(root, "vg").write_text(json.dumps({"annotations": anns}))
    return qids


def test_train_split_list_joins_train_val_and_vg_qa(shapes_copy, tmp_path):
    root = shapes_copy
    train, val = load_split(root, "train"), load_split(root, "val")
    val_images = sorted({e.image_id for e in val})[:2]
    vg_qids = _write_vg_qa(root, val_images)  # their pixels are in images/val2014

    cfg = compose_cfg([*TINY_PIXELS, "data.image_size=[64,64]", "data.train_split=[train,val,vg]"],
                      root, tmp_path / "run")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    ds = dm.dataset(cfg.data.train_split)
    assert [e.question_id for e in ds.entries] == [e.question_id for e in train + val] + vg_qids
    items = [ds[i] for i in range(len(ds))]
    assert all(it is not None for it in items) and ds.skipped.count == 0  # every image found
    assert sum(len(it["questions"]) for it in items) == len(train) + len(val) + len(vg_qids)
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape[-2:] == (64, 64)

    # The mcan-vqa spelling and a plain string keep working.
    for spelling, n in (("train+val", len(train) + len(val)), ("train", len(train))):
        cfg = compose_cfg([*TINY_PIXELS, f"data.train_split={spelling}"], root, tmp_path / "run")
        assert len(instantiate(cfg.data).dataset(cfg.data.train_split).entries) == n


def test_joined_splits_read_features_from_each_file(shapes_copy):
    root = shapes_copy
    paths = {s: str(write_features(root, "grid", s)) for s in ("train", "val", "test")}
    val_image = load_split(root, "val")[0].image_id
    store = split_features(paths, ["train", "val"])
    assert isinstance(store, ChainedFeatures) and val_image in store
    assert store.get(val_image)["grid"].shape[-1] == 32
    vg = split_features({"train": paths["train"], "val": paths["val"]}, ["vg"])  # VG-QA: COCO train + val
    assert val_image in vg
    test_image = load_split(root, "test")[0].image_id
    assert test_image in split_features({"test": paths["test"]}, ["test-dev"])  # test-dev: test2015 images
    with pytest.raises(DataError, match=r"no feature file configured for split 'vg' \(data.features.vg="):
        split_features({"test": paths["test"]}, ["vg"])


# -- results for EvalAI's Test-Dev phase -----------------------------------------------------------


def test_test_dev_results_cover_every_test2015_question(shapes_copy, tmp_path):
    root = shapes_copy
    test_qs = read_questions(layout.questions_path(root, "test"))
    dev = test_qs[: len(test_qs) // 2]
    layout.questions_path(root, "test-dev").write_text(
        json.dumps({"data_subtype": "test-dev2015", "questions": dev}))
    feats = write_region_features(root, "test", tmp_path / "region_test.h5")
    _, module = region_checkpoint(root, tmp_path / "region.ckpt")

    res = evaluate_split(module, root, split="test-dev", features=feats, output_dir=tmp_path / "out")
    assert res.results_path.name == "vqa_OpenEnded_mscoco_test-dev2015_gridvqa_results.json"
    written = json.loads(res.results_path.read_text())
    assert [r["question_id"] for r in written] == [q["question_id"] for q in test_qs]  # all, in order
    model_answers, _ = answer_split(module, root, "test-dev", features=feats)
    assert written[: len(dev)] == model_answers  # the test-dev ones are the model's
    assert all(r["answer"] == module.answers[0] for r in written[len(dev):])
    assert (res.num_questions, res.filled, res.scores) == (len(test_qs), len(test_qs) - len(dev), None)
    summary = res.summary()
    assert "every test2015 question" in summary and f"the other {res.filled} got" in summary

    # Without the test2015 questions no valid file can be made: said before the model is even loaded.
    layout.questions_path(root, "test").unlink()
    with pytest.raises(DataError) as ei:
        evaluate_split(tmp_path / "no-such.ckpt", root, split="test-dev")
    assert str(ei.value).startswith(f"{layout.questions_path(root, 'test')}: not found; EvalAI's Test-Dev")

    # A test-dev file that is not part of test2015 is refused, not silently padded.
    layout.questions_path(root, "test").write_text(json.dumps({"questions": test_qs[len(dev):]}))
    with pytest.raises(DataError, match=r"test-dev question\(s\) are not test2015 questions"):
        evaluate_split(module, root, split="test-dev", features=feats, output_dir=tmp_path / "out")
