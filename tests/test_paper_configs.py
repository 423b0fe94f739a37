"""Every conf/experiment/paper_*.yaml composes (with Hydra, as `python -m gridvqa.train` does) to MCAN as
published in MILVLG/mcan-vqa: its setting at a paper size (conf/size/), with no CPU size value in it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from gridvqa.models.mcan import MCAN_SIZES, MCANLayerNorm, build_mcan, mcan_config
from hydra_utils import EXPERIMENTS, compose_cfg

PAPER = [n for n in EXPERIMENTS if n.startswith("paper_")]
HEAD_SIZE = {"paper_e2e_x101_448": "small", "paper_e2e_r50_600": "small", "paper_region_small": "small",
             "paper_frozen_x152_large": "large"}

# mcan-vqa cfgs/small_model.yml, cfgs/large_model.yml (FF_SIZE = 4 x HIDDEN_SIZE in cfgs/base_cfgs.py):
# layers, hidden, heads, ffn, dropout, flat mlp, flat glimpses, flat out, LR_BASE
PUBLISHED = {"small": (6, 512, 8, 2048, 0.1, 512, 1, 1024, 1e-4),
             "large": (6, 1024, 8, 4096, 0.1, 512, 1, 2048, 5e-5)}
SIZE_FIELDS = ("layers", "hidden", "heads", "ffn", "dropout", "flat_mlp", "flat_glimpses", "flat_out")


def test_every_paper_file_is_checked():
    assert sorted(PAPER) == sorted(HEAD_SIZE)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("paper_root")
    (d / "answers.json").write_text('{"answers": ["yes", "no", "2"]}')
    return d


@pytest.mark.parametrize("name", PAPER)
def test_paper_file_is_mcan_as_published(name, root):
    cfg = compose_cfg([f"experiment={name}"], root)
    size = HEAD_SIZE[name]
    *sizes, lr = PUBLISHED[size]

    head = OmegaConf.to_container(cfg.model.head, resolve=True)
    built = mcan_config(**head)
    assert head["size"] == size
    assert tuple(getattr(built, f) for f in SIZE_FIELDS) == tuple(sizes)
    # the size's own FFN and dropout (no CPU size value); GloVe words (base_cfgs.py USE_GLOVE)
    assert dataclasses.replace(built, glove_path=None) == MCAN_SIZES[size]
    assert built.glove_path
    # core/model/net.py: img_feat_linear's output goes in as it is; net_utils.py's LayerNorm; GloVe-size LSTM
    assert (built.position_encoding, built.box_embedding, built.layer_norm) == ("none", False, "mcan")
    assert (built.text_encoder, built.word_dim) == ("lstm", 300)

    m = cfg.model
    # cfgs/base_cfgs.py OPT_BETAS / OPT_EPS; core/model/optim.py: Adam without weight decay
    assert m.lr == pytest.approx(lr)
    assert list(m.betas) == [0.9, 0.98] and m.eps == pytest.approx(1e-9) and m.weight_decay == 0.0
    assert m.backbone_weight_decay == 0.0  # nor on a trained backbone (any decay set is AdamW's)
    # core/model/optim.py WarmupOptimizer (1/4, 2/4, 3/4 in epochs 1-3), core/exec.py adjust_lr
    # (LR_DECAY_LIST [10, 12], LR_DECAY_R 0.2), MAX_EPOCH 13, GRAD_NORM_CLIP -1
    assert m.schedule == "mcan" and m.warmup_epochs == 3 and list(m.decay_epochs) == [10, 12]
    assert m.gamma == pytest.approx(0.2)
    t = cfg.trainer
    assert t.max_epochs == 13 and t.max_steps == -1 and t.gradient_clip_val is None
    assert t.get("accumulate_grad_batches", 1) == 1 and t.accelerator == "gpu"
    # BATCH_SIZE 64 questions, MAX_TOKEN 14, every training question
    d = cfg.data
    assert d.batch_size == 64 and d.group_by_image is False and d.max_length == 14
    assert d.limit_train is None and d.limit_val is None

    if m.source == "pixels":  # end to end: the backbone as grid-feats-vqa trains and extracts it
        bb = cfg.backbone
        assert bb.freeze_at == 2 and bb.norm == "FrozenBN" and bb.res5_dilation == 1
        assert bb.name in ("X-101-32x8d", "R-50") and bb.weights
        assert m.backbone_trainable is True
        assert d.image_size == [448, 448] if "448" in name else (d.short, d.max_size) == (600, 1000)


@pytest.mark.parametrize("size", ["small", "large"])
def test_paper_heads_build_to_mcan_vqa_modules(size, root):
    name = next(n for n, s in HEAD_SIZE.items() if s == size)
    head = OmegaConf.to_container(compose_cfg([f"experiment={name}"], root).model.head, resolve=True)
    head["glove_path"] = None  # sizes only: the vectors file is not needed (nor present) here
    with torch.device("meta"):
        m = build_mcan(**head, num_answers=3129, visual_dim=2048, vocab_size=20573)
    hidden, heads, ffn, flat_out = (PUBLISHED[size][i] for i in (1, 2, 3, 7))
    sga = m.encoder_decoder.decoder[0]
    assert sga.self_att.mha.num_heads == heads and sga.guided_att.mha.embed_dim == hidden
    assert sga.ffn[0].out_features == ffn and m.classifier.in_features == flat_out
    assert all(isinstance(n, MCANLayerNorm) for n in (sga.norm1, sga.norm2, sga.norm3, m.norm))
    assert m.visual.pos_enc == "none" and m.visual.box_proj is None
    assert not any("row_embed" in n or "box_proj" in n for n, _ in m.named_parameters())
