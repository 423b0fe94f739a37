"""DetectionAP (AP at IoU 0.5) against hand-worked cases, both interpolations, and state merging (DDP)."""

from __future__ import annotations

import pytest
import torch

from gridvqa.metrics.detection import DetectionAP, average_precision, match_detections

A = [0.0, 0.0, 10.0, 10.0]
B = [20.0, 20.0, 30.0, 30.0]
C = [40.0, 0.0, 50.0, 10.0]
NEAR_A = [1.0, 0.0, 11.0, 10.0]  # IoU with A = 90/110 > 0.5


def pred(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def gt(boxes, labels):
    return {"boxes": torch.tensor(boxes).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.int64)}


def ap(preds, targets, interpolation="coco101", **kw):
    m = DetectionAP(num_classes=3, interpolation=interpolation, **kw)
    m.update(preds, targets)
    return m.compute()


@pytest.mark.parametrize("interp", ["coco101", "voc_all"])
def test_perfect_detection_is_one(interp):
    out = ap([pred([A], [0.9], [1]), pred([B, C], [0.8, 0.7], [1, 2])],
             [gt([A], [1]), gt([B, C], [1, 2])], interp)
    assert out["ap50"].item() == pytest.approx(1.0)
    assert out["num_classes_evaluated"] == 2


@pytest.mark.parametrize("interp", ["coco101", "voc_all"])
def test_false_positive_ranked_above_the_true_positive(interp):
    # ranks: FP (p=0), TP (recall 1, p=1/2) -> precision 1/2 at every recall
    out = ap([pred([C, A], [0.9, 0.8], [1, 1])], [gt([A], [1])], interp)
    assert out["ap50"].item() == pytest.approx(0.5)


def test_missed_ground_truth():
    # one of two boxes found: precision 1 up to recall 1/2, nothing beyond
    preds, targets = [pred([A], [0.9], [1])], [gt([A, B], [1, 1])]
    assert ap(preds, targets, "voc_all")["ap50"].item() == pytest.approx(0.5)
    assert ap(preds, targets, "coco101")["ap50"].item() == pytest.approx(51 / 101)  # recall points 0..0.50


def test_duplicate_detection_is_a_false_positive():
    # TP on A (r=.5, p=1), duplicate on A (FP: r=.5, p=.5), TP on B (r=1, p=2/3)
    preds, targets = [pred([A, NEAR_A, B], [0.9, 0.8, 0.7], [1, 1, 1])], [gt([A, B], [1, 1])]
    assert ap(preds, targets, "voc_all")["ap50"].item() == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert ap(preds, targets, "coco101")["ap50"].item() == pytest.approx((51 + 50 * 2 / 3) / 101)
    p, g = pred([A, NEAR_A, B], [0.9, 0.8, 0.7], [1, 1, 1]), gt([A, B], [1, 1])
    tp = match_detections(*p.values(), *g.values())
    assert tp.tolist() == [True, False, True]


def test_two_classes_mean_over_classes_with_ground_truth():
    preds = [pred([A, C, B, B], [0.9, 0.8, 0.6, 0.5], [1, 2, 2, 3])]
    # class 1 perfect (1.0); class 2 FP (C) above TP (B) (0.5); class 3 has no ground truth: ignored
    targets = [gt([A, B], [1, 2])]
    out = ap(preds, targets, "voc_all")
    assert out["ap50"].item() == pytest.approx(0.75)
    per = out["ap50_per_class"]
    assert per.shape == (4,) and per[1].item() == pytest.approx(1.0) and per[2].item() == pytest.approx(0.5)
    assert torch.isnan(per[0]) and torch.isnan(per[3])


def test_wrong_class_or_low_iou_does_not_match():
    shifted = [6.0, 0.0, 16.0, 10.0]  # IoU with A = 40/160
    out = ap([pred([A, shifted], [0.9, 0.8], [2, 1])], [gt([A], [1])], "voc_all")
    assert out["ap50"].item() == 0.0


def test_each_detection_takes_the_best_unmatched_ground_truth():
    # G1 and G2 overlap; the top detection overlaps G2 best, the second G1 only: both match (COCO rule)
    g1, g2 = [0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0]
    d1, d2 = [2.0, 0.0, 12.0, 10.0], [0.0, 0.0, 9.0, 10.0]
    tp = match_detections(*pred([d1, d2], [0.9, 0.8], [1, 1]).values(), *gt([g1, g2], [1, 1]).values())
    assert tp.tolist() == [True, True]


def test_max_detections_per_image_drops_the_lowest_scores():
    preds = [pred([C, A], [0.9, 0.1], [1, 1])]
    assert ap(preds, [gt([A], [1])], "voc_all", max_detections_per_image=1)["ap50"].item() == 0.0
    assert ap(preds, [gt([A], [1])], "voc_all")["ap50"].item() == pytest.approx(0.5)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_merged_states_equal_one_pass_as_under_ddp():
    preds = [pred([C, A], [0.9, 0.8], [1, 1]), pred([B], [0.95], [2]), pred([], [], [])]
    targets = [gt([A], [1]), gt([B, C], [2, 1]), gt([A], [2])]
    whole = DetectionAP(num_classes=3)
    whole.update(preds, targets)
    left, right = DetectionAP(num_classes=3), DetectionAP(num_classes=3)
    left.update(preds[:1], targets[:1])
    right.update(preds[1:], targets[1:])
    left.merge_state(right)
    assert left.compute()["ap50"].item() == pytest.approx(whole.compute()["ap50"].item())
    whole.reset()
    assert whole.compute()["ap50"].item() == 0.0


def test_average_precision_and_bad_input():
    assert average_precision(torch.tensor([]), torch.tensor([], dtype=torch.bool), 3) == 0.0
    with pytest.raises(ValueError, match="at least one ground-truth"):
        average_precision(torch.tensor([0.5]), torch.tensor([True]), 0)
    m = DetectionAP()
    with pytest.raises(ValueError, match="prediction 0 lacks \\['scores'\\]"):
        m.update([{"boxes": torch.zeros(1, 4), "labels": torch.ones(1)}], [gt([A], [1])])
    with pytest.raises(ValueError, match="target 0 needs boxes"):
        m.update([pred([A], [0.5], [1])], [{"boxes": torch.zeros(4), "labels": torch.ones(1)}])
    with pytest.raises(ValueError, match="interpolation 'x' unknown"):
        DetectionAP(interpolation="x")


def test_agrees_with_torchmetrics_coco_map50():
    pytest.importorskip("pycocotools")
    from torchmetrics.detection import MeanAveragePrecision

    preds = [pred([A, NEAR_A, B], [0.9, 0.8, 0.7], [1, 1, 1]), pred([C, A], [0.9, 0.6], [2, 2])]
    targets = [gt([A, B, C], [1, 1, 1]), gt([A], [2])]
    ref = MeanAveragePrecision(iou_thresholds=[0.5])
    ref.update(preds, targets)
    assert ap(preds, targets)["ap50"].item() == pytest.approx(ref.compute()["map_50"].item(), abs=1e-4)


def _ddp_worker(rank: int, init_file: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        m = DetectionAP(num_classes=3)
        if rank == 0:  # rank 1 sees no image at all: its empty states must still gather
            m.update([pred([C, A], [0.9, 0.8], [1, 1])], [gt([A], [1])])
        queue.put((rank, m.compute()["ap50"].item()))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_ddp_gather_with_an_idle_rank(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, str(tmp_path / "init"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=90) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == {0: pytest.approx(0.5), 1: pytest.approx(0.5)}
