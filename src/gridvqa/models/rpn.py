"""Region proposal network on one feature map, built from torchvision's detection parts.

Two detectron2 behaviours torchvision lacks are added here because the grid-feats-vqa recipe (and its
checkpoints) depend on them: anchors at the backbone's *stated* stride (torchvision infers it as
padded-image-size // feature-size, wrong when the padding is not a multiple of the stride), unrounded
cell anchors, and the optional boundary threshold that ignores anchors crossing the image border.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead


class StridedAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator for a single feature map whose stride is given, not inferred.

    Cell anchors are ordered ratio-major (torchvision): index = ratio_index * len(sizes) + size_index.
    detectron2 orders them size-major; `detectron2_heads_to_detector` permutes the RPN channels.
    """

    def __init__(self, sizes: Sequence[float], aspect_ratios: Sequence[float]) -> None:
        super().__init__((tuple(float(s) for s in sizes),), (tuple(float(r) for r in aspect_ratios),))
        # Set by the detector before every forward, from backbone.output_shape() (dilation can change it).
        self.stride: int = 0

    def generate_anchors(
        self,
        scales: Sequence[float],
        aspect_ratios: Sequence[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> Tensor:
        # As torchvision but without .round(): detectron2 keeps sub-pixel anchor sides.
        scales_t = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios_t = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios_t)
        ws = ((1 / h_ratios)[:, None] * scales_t[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales_t[None, :]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if self.stride <= 0:
            raise RuntimeError("StridedAnchorGenerator.stride must be set (by the detector) before forward")
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        device = feature_maps[0].device
        s = torch.tensor(self.stride, dtype=torch.int64, device=device)
        # float32 whatever the map's dtype: bfloat16 anchors are 4-8 px apart at x = 600..1000, so
        # proposals under autocast would move by pixels (torchvision uses the map's dtype).
        self.set_cell_anchors(torch.float32, device)
        per_level = self.grid_anchors(grid_sizes, [[s, s] for _ in grid_sizes])
        anchors = torch.cat(per_level)
        return [anchors for _ in image_list.image_sizes]


class Float32RPNHead(RPNHead):
    """torchvision's RPNHead with float32 outputs: under autocast the deltas would be bfloat16, and
    torchvision's BoxCoder casts the anchors to the deltas' dtype,
    losing whole pixels of proposal precision."""

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class BoundaryRPN(RegionProposalNetwork):
    """torchvision's RPN plus detectron2's `BOUNDARY_THRESH`: anchors reaching more than `boundary_thresh`
    pixels outside their (unpadded) image are ignored in the RPN loss; a negative value disables it."""

    def __init__(self, *args, boundary_thresh: float = -1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.boundary_thresh = boundary_thresh
        self._image_sizes: list[tuple[int, int]] = []

    def forward(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        # assign_targets_to_anchors does not receive the image sizes; keep them for this call only.
        self._image_sizes = list(images.image_sizes)
        try:
            return super().forward(images, features, targets)
        finally:
            self._image_sizes = []

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        labels, matched = super().assign_targets_to_anchors(anchors, targets)
        if self.boundary_thresh >= 0:
            t = self.boundary_thresh
            for lab, anc, (h, w) in zip(labels, anchors, self._image_sizes, strict=True):
                inside = (anc[:, 0] >= -t) & (anc[:, 1] >= -t) & (anc[:, 2] < w + t) & (anc[:, 3] < h + t)
                lab[~inside] = -1.0
        return labels, matched

    def compute_loss(
        self,
        objectness: Tensor,
        pred_bbox_deltas: Tensor,
        labels: list[Tensor],
        regression_targets: list[Tensor],
    ) -> tuple[Tensor, Tensor]:
        # With every anchor ignored (all cross the border of small images) torchvision's mean over no anchors
        # is NaN; detectron2 normalises by the sampling budget instead and gets zero.
        if not any(bool((lab >= 0).any()) for lab in labels):
            zero = objectness.sum() * 0.0 + pred_bbox_deltas.sum() * 0.0
            return zero, zero
        return super().compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)


def build_rpn(
    in_channels: int,
    *,
    anchor_sizes: Sequence[float] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    pre_nms_top_n_train: int = 12000,
    post_nms_top_n_train: int = 2000,
    pre_nms_top_n_test: int = 6000,
    post_nms_top_n_test: int = 1000,
    nms_thresh: float = 0.7,
    fg_iou_thresh: float = 0.7,
    bg_iou_thresh: float = 0.3,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
    boundary_thresh: float = -1.0,
) -> BoundaryRPN:
    """A single-level RPN (3x3 conv + objectness / deltas 1x1 convs) as in detectron2's StandardRPNHead."""
    anchor_gen = StridedAnchorGenerator(anchor_sizes, aspect_ratios)
    head = Float32RPNHead(in_channels, anchor_gen.num_anchors_per_location()[0])
    return BoundaryRPN(
        anchor_gen,
        head,
        fg_iou_thresh,
        bg_iou_thresh,
        batch_size_per_image,
        positive_fraction,
        {"training": pre_nms_top_n_train, "testing": pre_nms_top_n_test},
        {"training": post_nms_top_n_train, "testing": post_nms_top_n_test},
        nms_thresh,
        boundary_thresh=boundary_thresh,
    )
