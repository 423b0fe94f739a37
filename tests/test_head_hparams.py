"""Checkpoints carry every field of the MCAN head; a checkpoint whose head lacks the addition flags
(position encoding, box embedding, LayerNorm kind) is rebuilt with the head it was trained with."""

from __future__ import annotations

import torch

from gridvqa.data import layout
from gridvqa.data.vqa2 import AnswerVocab
from gridvqa.inference import load_model
from gridvqa.lit.vqa_module import VQAModule, head_hparams_from_checkpoint
from gridvqa.models.mcan import MCANLayerNorm


def _module(root, head):
    torch.manual_seed(0)
    tokenizer_json = (layout.tokenizer_dir(root) / "tokenizer.json").read_text(encoding="utf-8")
    answers = AnswerVocab.load(layout.answers_path(root)).answers
    return VQAModule(source="region_h5", visual_dim=16, head=head, answers=answers,
                     tokenizer_json=tokenizer_json)


def test_checkpoint_head_holds_every_field(tiny_shapes, tmp_path):
    m = _module(tiny_shapes, {"size": "tiny"})
    head = m.hparams.head
    assert head["size"] == "tiny" and head["hidden"] == 128 and head["heads"] == 4
    assert (head["position_encoding"], head["box_embedding"], head["layer_norm"]) == ("none", False, "mcan")
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, path)
    loaded = load_model(path)
    assert loaded.head.visual.box_proj is None and isinstance(loaded.head.norm, MCANLayerNorm)


def test_checkpoint_without_addition_flags_loads_as_trained(tiny_shapes, tmp_path):
    additions = {"position_encoding": "sine", "box_embedding": True, "layer_norm": "torch"}
    m = _module(tiny_shapes, {"size": "tiny", **additions}).eval()
    hp = dict(m.hparams)
    hp["head"] = {"size": "tiny"}  # the form of a head whose defaults were those additions
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": hp}, path)
    loaded = load_model(path)  # strict: every weight (box_proj included) must fit
    assert loaded.head.visual.box_proj is not None and isinstance(loaded.head.norm, torch.nn.LayerNorm)
    q = torch.randint(1, 20, (2, 5))
    feats, boxes = torch.randn(2, 6, 16), torch.rand(2, 6, 4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    with torch.no_grad():
        before = m.head(q, None, feats, mask, boxes=boxes)
        assert torch.equal(before, loaded.head(q, None, feats, mask, boxes=boxes))


def test_head_hparams_from_checkpoint():
    assert head_hparams_from_checkpoint(None) == {"size": "tiny", "position_encoding": "sine",
                                                  "box_embedding": True, "layer_norm": "torch"}
    old = head_hparams_from_checkpoint({"size": "large", "pos_enc": "learned", "use_boxes": False})
    assert old == {"size": "large", "position_encoding": "learned", "box_embedding": False,
                   "layer_norm": "torch", "heads": 16}
    new = {"size": "large", "layer_norm": "mcan", "heads": 8}
    assert head_hparams_from_checkpoint(new) == new
