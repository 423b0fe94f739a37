"""Grid (1x1 RoI) and C4 detectors on a tiny backbone: losses, gradients, inference, converter, overfit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gridvqa.errors import ConfigError
from gridvqa.models.backbone import build_backbone
from gridvqa.models.detector import C4Detector, GridDetector, build_detector, detectron2_heads_to_detector
from gridvqa.models.roi_heads import attribute_loss
from gridvqa.models.rpn import StridedAnchorGenerator, build_rpn

LOSSES = {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box_reg", "loss_attr"}
SMALL = dict(
    anchor_sizes=[16, 32, 64],
    batch_size_per_image=32,
    rpn_batch_size_per_image=64,
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=50,
    rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=60,
    fc_dim=64,
)


def make_detector(kind: str, num_classes: int = 3, num_attributes: int = 4, norm: str = "BN", **cfg):
    torch.manual_seed(0)
    backbone = build_backbone("R-tiny", norm=norm, freeze_at=0, res5_dilation=2 if kind == "grid" else 1)
    return build_detector(kind, backbone, num_classes, num_attributes, **{**SMALL, **cfg})


def synthetic_batch():
    """Two 64x64 images, one bright rectangle each (different channel per class), one box each."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=g) * 0.1
    boxes = [torch.tensor([[8.0, 12.0, 40.0, 44.0]]), torch.tensor([[24.0, 16.0, 56.0, 56.0]])]
    for i, b in enumerate(boxes):
        x1, y1, x2, y2 = b[0].int().tolist()
        images[i, i, y1:y2, x1:x2] += 2.0
    targets = [
        {"boxes": boxes[i], "labels": torch.tensor([i + 1]), "attributes": torch.tensor([[i, 2] + [-1] * 14])}
        for i in range(2)
    ]
    return images, [(64, 64), (64, 64)], targets


@pytest.mark.parametrize("kind", ["grid", "c4"])
def test_training_losses_are_finite_and_reach_the_backbone(kind):
    det = make_detector(kind).train()
    images, sizes, targets = synthetic_batch()
    losses = det(images, sizes, targets)
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    # timm zero-initialises each block's last norm, so the gradient reaches the stem through the shortcuts
    for name in ("body.conv1.weight", "body.layer2.0.downsample.0.weight"):
        grad = det.backbone.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    for name in ("rpn.head.cls_logits.weight", "roi_heads.box_predictor.cls_score.weight",
                 "roi_heads.attribute_predictor.attr_score.weight"):
        assert det.get_parameter(name).grad.abs().sum() > 0, name


def test_no_attribute_head_without_attributes_and_empty_image_trains():
    det = make_detector("grid", num_attributes=0).train()
    images, sizes, targets = synthetic_batch()
    targets[1] = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    losses = det(images, sizes, [{k: v for k, v in t.items() if k != "attributes"} for t in targets])
    assert set(losses) == LOSSES - {"loss_attr"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert det.roi_heads.attribute_predictor is None
    # an image without boxes, as the VG dataset gives it (attributes [0, 16]), next to one with attributes
    det = make_detector("grid").train()
    targets[1]["attributes"] = torch.zeros((0, 16), dtype=torch.int64)
    losses = det(images, sizes, targets)
    assert set(losses) == LOSSES and all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("kind", ["grid", "c4"])
def test_eval_returns_boxes_inside_each_image_and_region_features(kind):
    det = make_detector(kind, min_boxes=5, max_boxes=20).eval()
    images, _, _ = synthetic_batch()
    sizes = [(64, 64), (48, 40)]
    with torch.no_grad():
        out = det(images, sizes)
    width = 64 if kind == "grid" else det.backbone.output_shape()["res5"].channels
    assert det.feature_dim == width
    for res, (h, w) in zip(out, sizes, strict=True):
        k = res["boxes"].shape[0]
        assert 5 <= k <= 20
        b = res["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert res["features"].shape == (k, width)
        assert res["scores"].shape == (k,) and res["labels"].shape == (k,)
        assert ((res["labels"] >= 1) & (res["labels"] <= 3)).all()
        assert res["attr_scores"].shape == (k, 4)
        assert res["proposal_boxes"].shape == (k, 4)


def test_fixed_36_boxes_and_region_features_match_their_proposals():
    det = make_detector("grid", min_boxes=36, max_boxes=36).eval()
    images, sizes, _ = synthetic_batch()
    with torch.no_grad():
        out = det(images, sizes)
        for i, res in enumerate(out):
            assert res["boxes"].shape[0] == 36
            # "features" are the vectors of the proposal regions they report
            feats = det.backbone.forward_until(images[i : i + 1], "res5")
            again = det.box_features(feats, [res["proposal_boxes"]])
            torch.testing.assert_close(again, res["features"], rtol=1e-4, atol=1e-5)


def test_roi_pool_and_roi_align_both_run_and_differ():
    images, sizes, targets = synthetic_batch()
    outs = {}
    for pooler in ("roi_align", "roi_pool"):
        det = make_detector("grid", pooler=pooler)
        assert det.pooler == pooler
        losses = det.train()(images, sizes, targets)
        assert all(torch.isfinite(v) for v in losses.values())
        feats = det.backbone.forward_until(images, "res5")
        outs[pooler] = det._pool(feats, [t["boxes"] for t in targets])
        assert outs[pooler].shape[-2:] == (1, 1)
    assert not torch.allclose(outs["roi_align"], outs["roi_pool"])


def test_bfloat16_autocast_keeps_boxes_and_losses_in_float32():
    det = make_detector("grid").train()
    images, sizes, targets = synthetic_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = det(images, sizes, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = det.eval()(images, sizes)
    assert out[0]["boxes"].dtype == torch.float32 and out[0]["proposal_boxes"].dtype == torch.float32


def test_stride_follows_backbone_dilation_and_c4_reads_res4():
    grid = make_detector("grid")
    assert grid.stride == 16 and grid.pooler_resolution == 1 and grid.sampling_ratio == 2
    grid.backbone.set_res5_dilation(1)
    assert grid.stride == 32
    with torch.no_grad():
        out = grid.eval()(torch.randn(1, 3, 96, 96), [(96, 96)])
    assert out[0]["boxes"].shape[1] == 4
    c4 = make_detector("c4")
    assert c4.stride == c4.backbone.output_shape()["res4"].stride and c4.pooler_resolution == 14
    assert isinstance(grid, GridDetector) and isinstance(c4, C4Detector)


def test_state_dict_names_and_c4_does_not_duplicate_res5():
    grid = make_detector("grid").state_dict()
    for key in ("rpn.head.conv.0.0.weight", "rpn.head.cls_logits.weight", "rpn.head.bbox_pred.weight",
                "roi_heads.box_head.fc1.weight", "roi_heads.box_head.fc2.weight",
                "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.bbox_pred.weight",
                "roi_heads.attribute_predictor.obj_embed.weight", "roi_heads.attribute_predictor.fc.0.weight",
                "roi_heads.attribute_predictor.attr_score.weight"):
        assert key in grid, key
    assert grid["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4  # 3 classes + background
    assert grid["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 16
    assert grid["roi_heads.attribute_predictor.attr_score.weight"].shape[0] == 4  # no "no-attribute" class
    c4 = make_detector("c4").state_dict()
    assert not [k for k in c4 if k.startswith("roi_heads.") and ("layer4" in k or "res5" in k)]
    assert not any(k.startswith("roi_heads.box_head") for k in c4)


def test_bad_inputs_and_config_give_one_line_errors():
    det = make_detector("grid").train()
    images, sizes, targets = synthetic_batch()
    with pytest.raises(ValueError, match="one target dict per image"):
        det(images, sizes)
    bad = [dict(targets[0], labels=torch.tensor([0])), targets[1]]
    with pytest.raises(ValueError, match=r"target 0 labels must be in 1\.\.3"):
        det(images, sizes, bad)
    with pytest.raises(ValueError, match="larger than the padded batch"):
        det(images, [(64, 64), (65, 64)], targets)
    with pytest.raises(ConfigError, match="unknown keys.*anchor_size"):
        build_detector("grid", det.backbone, 3, 0, anchor_size=[8])
    with pytest.raises(ConfigError, match="kind 'fpn' unknown"):
        build_detector("fpn", det.backbone, 3, 0)
    with pytest.raises(ConfigError, match="pooler 'max' unknown"):
        build_detector("grid", det.backbone, 3, 0, pooler="max")


# -- attribute loss ------------------------------------------------------------------------------------------
def test_attribute_loss_hand_worked():
    scores = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0], [5.0, 1.0, 2.0]], requires_grad=True)
    labels = torch.full((3, 16), -1, dtype=torch.int64)
    labels[0, :2] = torch.tensor([0, 2])  # two labels, each -log(1/3), weighted 1/2 -> log 3
    labels[1, 0] = 1  # probs (1/4, 1/2, 1/4): -log(1/2) = log 2
    # box 2 has no attribute: it adds nothing and is not counted
    loss = attribute_loss(scores, labels, loss_weight=0.2)
    assert loss.item() == pytest.approx(0.2 * (math.log(3.0) + math.log(2.0)) / 2, rel=1e-6)
    loss.backward()
    assert scores.grad[2].abs().sum() == 0
    empty = attribute_loss(scores, torch.full((3, 16), -1, dtype=torch.int64))
    assert empty.item() == 0.0 and empty.requires_grad


def test_attribute_loss_equals_grid_feats_formulation():
    torch.manual_seed(1)
    n, m, a = 7, 16, 11
    scores = torch.randn(n, a)
    labels = torch.full((n, m), -1, dtype=torch.int64)
    for i, k in enumerate([0, 1, 3, 16, 2, 0, 5]):
        labels[i, :k] = torch.randint(0, a, (k,))
    # the reference's expanded form: every (box, slot) pair, weight 1/count, ignore_index -1
    inv = (labels >= 0).sum(1).repeat(m, 1).t().flatten().float()
    w = inv.reciprocal()
    w[w > 1] = 0.0
    ce = F.cross_entropy(scores.unsqueeze(1).expand(n, m, a).reshape(-1, a), labels.reshape(-1),
                         reduction="none", ignore_index=-1)
    ref = (ce * w).sum() * 0.5 / int(((labels >= 0).sum(1) > 0).sum())
    assert attribute_loss(scores, labels, 0.5).item() == pytest.approx(ref.item(), rel=1e-5)


# -- anchors and RPN --------------------------------------------------------------------------------
def d2_cell_anchors(sizes, ratios):
    """detectron2 DefaultAnchorGenerator.generate_cell_anchors: size-major, unrounded."""
    out = []
    for size in sizes:
        for ar in ratios:
            w = math.sqrt(size * size / ar)
            h = ar * w
            out.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(out)


def test_anchors_use_the_stated_stride_not_the_padded_size():
    gen = StridedAnchorGenerator([16, 32], [0.5, 1.0, 2.0])
    gen.stride = 16
    feat = torch.zeros(1, 8, 7, 5)  # e.g. a 100x72 padded batch: torchvision would infer strides 14 and 14
    from torchvision.models.detection.image_list import ImageList

    anchors = gen(ImageList(torch.zeros(1, 3, 100, 72), [(100, 72)]), [feat])[0]
    assert anchors.shape == (7 * 5 * 6, 4)
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert torch.allclose(centers[-1], torch.tensor([4 * 16.0, 6 * 16.0]))
    assert torch.allclose(centers % 16, torch.zeros_like(centers), atol=1e-4)


def test_anchors_stay_float32_for_a_bfloat16_feature_map():
    """Under autocast the map is bfloat16; anchors in bfloat16 would be 8 px apart near x = 1000."""
    from torchvision.models.detection.image_list import ImageList

    gen = StridedAnchorGenerator([32, 64], [0.5, 1.0, 2.0])
    gen.stride = 32
    images = ImageList(torch.zeros(1, 3, 608, 1024), [(600, 1000)])
    feat = torch.zeros(1, 8, 19, 32)
    half = gen(images, [feat.bfloat16()])[0]
    full = gen(images, [feat])[0]
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0, atol=0)
    centers = (half[:, 0] + half[:, 2]) / 2
    assert torch.allclose(centers % 32, torch.zeros_like(centers), atol=1e-3)


def test_rpn_boundary_threshold_ignores_anchors_crossing_the_border():
    rpn = build_rpn(8, anchor_sizes=[32], aspect_ratios=[1.0], boundary_thresh=0.0)
    anchors = [torch.tensor([[-16.0, -16.0, 16.0, 16.0], [8.0, 8.0, 40.0, 40.0], [40.0, 40.0, 72.0, 72.0]])]
    rpn._image_sizes = [(64, 64)]
    labels, _ = rpn.assign_targets_to_anchors(anchors, [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]])}])
    assert labels[0].tolist() == [-1.0, 1.0, -1.0]
    rpn.boundary_thresh = -1.0
    labels, _ = rpn.assign_targets_to_anchors(anchors, [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]])}])
    assert labels[0].tolist() == [0.0, 1.0, 0.0]


def test_rpn_boundary_threshold_in_a_training_forward():
    """Anchors of 128 px on a 64 px image all cross its border: with BOUNDARY_THRESH 0 none is trained on
    (a zero loss, not NaN); switched off, they are."""
    from torchvision.models.detection.image_list import ImageList

    torch.manual_seed(0)
    feats = {"res5": torch.randn(1, 8, 4, 4, requires_grad=True)}
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 60.0, 60.0]])}]
    for thresh, trained in ((0.0, False), (-1.0, True)):
        rpn = build_rpn(8, anchor_sizes=[128], aspect_ratios=[1.0], boundary_thresh=thresh)
        rpn.anchor_generator.stride = 16
        rpn.train()
        _, losses = rpn(images, feats, targets)
        assert all(torch.isfinite(v) for v in losses.values())
        assert (float(losses["loss_objectness"].detach()) > 0) is trained
        sum(losses.values()).backward()  # the graph holds even when nothing is trained on


# -- detectron2 head conversion ----------------------------------------------------------------------
def test_detectron2_heads_convert_with_class_and_anchor_permutations():
    sizes, ratios = [16, 32, 64, 128], [0.5, 1.0, 2.0]
    S, R, A, C, NA = len(sizes), len(ratios), len(sizes) * len(ratios), 5, 4
    det = make_detector("grid", num_classes=C, num_attributes=NA, anchor_sizes=sizes, aspect_ratios=ratios)
    ch = det.backbone.output_shape()["res5"].channels
    D = 64
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    chan = torch.arange(A, dtype=torch.float32)
    sd = {
        "proposal_generator.rpn_head.conv.weight": rnd(ch, ch, 3, 3),
        "proposal_generator.rpn_head.conv.bias": rnd(ch),
        # channel d of detectron2's objectness / delta block d holds the value d: we can see where it lands
        "proposal_generator.rpn_head.objectness_logits.weight": chan.view(A, 1, 1, 1).expand(A, ch, 1, 1) + 0,
        "proposal_generator.rpn_head.objectness_logits.bias": chan.clone(),
        "proposal_generator.rpn_head.anchor_deltas.weight": chan.repeat_interleave(4).view(4 * A, 1, 1, 1)
        .expand(4 * A, ch, 1, 1).clone(),
        "proposal_generator.rpn_head.anchor_deltas.bias": chan.repeat_interleave(4) * 10
        + torch.arange(4).repeat(A),
        "roi_heads.box_head.fc1.weight": rnd(D, ch),
        "roi_heads.box_head.fc1.bias": rnd(D),
        "roi_heads.box_head.fc2.weight": rnd(D, D),
        "roi_heads.box_head.fc2.bias": rnd(D),
        "roi_heads.box_predictor.cls_score.weight": rnd(C + 1, D),
        "roi_heads.box_predictor.cls_score.bias": rnd(C + 1),
        "roi_heads.box_predictor.bbox_pred.weight": rnd(C * 4, D),
        "roi_heads.box_predictor.bbox_pred.bias": rnd(C * 4),
        "roi_heads.attribute_predictor.obj_embed.weight": rnd(C + 1, 256),
        "roi_heads.attribute_predictor.fc.0.weight": rnd(512, D + 256),
        "roi_heads.attribute_predictor.fc.0.bias": rnd(512),
        "roi_heads.attribute_predictor.attr_score.weight": rnd(NA, 512),
        "roi_heads.attribute_predictor.attr_score.bias": rnd(NA),
        "backbone.res2.0.conv1.weight": rnd(4, 4, 1, 1),
    }
    ours, rest = detectron2_heads_to_detector(sd, num_sizes=S, num_ratios=R)
    assert rest == ["backbone.res2.0.conv1.weight"]
    result = det.load_state_dict(ours, strict=False)
    assert result.unexpected_keys == []
    assert not [k for k in result.missing_keys if not k.startswith("backbone.")]

    # Our anchor t has the geometry of detectron2's anchor perm[t]; its channels must carry that anchor.
    d2_cells = d2_cell_anchors(sizes, ratios)
    cells = det.rpn.anchor_generator.cell_anchors[0]
    obj_b = det.rpn.head.cls_logits.bias.detach()
    for t in range(A):
        d = int(obj_b[t])
        torch.testing.assert_close(cells[t], d2_cells[d].float())
        assert d == (t % S) * R + t // S
        assert det.rpn.head.cls_logits.weight[t].unique().tolist() == [float(d)]
        assert det.rpn.head.bbox_pred.bias[4 * t : 4 * t + 4].tolist() == [d * 10.0 + k for k in range(4)]
    # size 32 ratio 0.5 is detectron2's anchor 1*3+0 = 3 and our anchor 0*4+1 = 1
    assert int(obj_b[1]) == 3

    P = det.roi_heads.box_predictor
    torch.testing.assert_close(P.cls_score.weight[0], sd["roi_heads.box_predictor.cls_score.weight"][-1])
    torch.testing.assert_close(P.cls_score.weight[1:], sd["roi_heads.box_predictor.cls_score.weight"][:-1])
    assert P.bbox_pred.weight[:4].abs().sum() == 0
    torch.testing.assert_close(P.bbox_pred.weight[4:], sd["roi_heads.box_predictor.bbox_pred.weight"])
    emb = det.roi_heads.attribute_predictor.obj_embed.weight
    torch.testing.assert_close(emb[0], sd["roi_heads.attribute_predictor.obj_embed.weight"][-1])
    torch.testing.assert_close(emb[3], sd["roi_heads.attribute_predictor.obj_embed.weight"][2])

    with pytest.raises(ConfigError, match=r"objectness_logits\.weight has 12 channels, expected 15"):
        detectron2_heads_to_detector(sd, num_sizes=5, num_ratios=3)


# -- learning --------------------------------------------------------------------------------
def _overfit(kind: str, steps: int) -> list[dict[str, float]]:
    det = make_detector(kind, norm="GN").train()
    images, sizes, targets = synthetic_batch()
    opt = torch.optim.SGD([p for p in det.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    history = []
    for _ in range(steps):
        losses = det(images, sizes, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    return history


def _check_went_down(history: list[dict[str, float]]) -> None:
    total = [sum(h.values()) for h in history]
    first, last = total[0], sum(total[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    for key in ("loss_rpn_cls", "loss_cls", "loss_attr"):
        assert sum(h[key] for h in history[-5:]) / 5 < 0.8 * history[0][key], key


def test_grid_detector_overfits_two_images():
    _check_went_down(_overfit("grid", 20))


@pytest.mark.slow
def test_c4_detector_overfits_two_images():
    _check_went_down(_overfit("c4", 40))
