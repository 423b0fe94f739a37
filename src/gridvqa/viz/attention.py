"""Attention pictures: where a VQA checkpoint looked, drawn over the original image.

`explain` runs a model once on one image + question (pixels: the image itself; grid_h5 / region_h5: the
image's stored features, the image only for drawing) and keeps its attention on the *valid* visual tokens:
AttFlat weights [N] and every guided-attention layer's head-averaged weights [N, T]. An `Explanation`
then gives a distribution over the N cells/boxes for any choice (AttFlat, or a guided layer averaged over
the question's words or for one word), a heat map in original-image pixels (grid models, see
`gridvqa.viz.geometry`), and is drawn with matplotlib's object API on the Agg canvas (no pyplot, no
screen): the image with the heat map or the boxes shaded by weight, the top answers with their scores and
the ground truth when known. Several models on one question are drawn side by side.

Used by `python -m gridvqa.visualize` and notebooks/attention.ipynb.
"""

from __future__ import annotations

import io
import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from gridvqa.atomic import atomic_write_bytes
from gridvqa.data import layout
from gridvqa.devices import resolve_device
from gridvqa.errors import ConfigError, DataError
from gridvqa.inference import EvalMode, check_split, load_model
from gridvqa.single_question import (
    QuestionBatch,
    check_question,
    open_features,
    question_batch,
    read_picture,
    top_answers,
)
from gridvqa.viz.geometry import GridGeometry

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from PIL import Image

    from gridvqa.data.features import GridFeatures, RegionFeatures
    from gridvqa.data.vqa2 import VQAEntry
    from gridvqa.lit.vqa_module import VQAModule

log = logging.getLogger(__name__)

WHICH = ("flat", "guided")
CMAP = "jet"
DIM = 0.4  # brightness left where a grid model pays the least attention
CONTOURS = (0.25, 0.5, 0.75, 0.9)  # heat-map levels drawn as lines, as fractions of its range


# ---------------------------------------------------------------------------------------------------
# One model, one image, one question


@dataclass
class Explanation:
    """A model's answer to one question with its attention on the valid visual tokens.

    Grid models: tokens are the grid's cells, row-major, placed by `grid`. Region models: tokens are the
    boxes ([N, 4] x1, y1, x2, y2 in original-image pixels) with `box_labels`.
    """

    model_name: str
    question: str
    tokens: list[str]  # the question's words as the model saw them (padding dropped)
    image: np.ndarray  # the original image, uint8 [H, W, 3]
    flat: np.ndarray  # AttFlat weights [N]
    guided: list[np.ndarray]  # one [N, T] per decoder layer, averaged over heads; rows sum to 1 over words
    top: list[tuple[str, float]]  # answers with sigmoid scores, best first
    word_weights: np.ndarray | None = None  # the question's AttFlat weights [T]: how much each word counts
    grid: GridGeometry | None = None
    boxes: np.ndarray | None = None
    box_labels: list[str] | None = None
    question_id: int | None = None
    gt_answers: list[str] | None = None  # the human answers when known

    @property
    def kind(self) -> str:
        return "grid" if self.grid is not None else "region"

    def _token_index(self, token: int | str) -> int:
        if isinstance(token, str):
            if token not in self.tokens:
                raise ConfigError(f"token={token!r} is not a word of the question (its words: {self.tokens})")
            return self.tokens.index(token)
        if not -len(self.tokens) <= int(token) < len(self.tokens):
            raise ConfigError(f"token={token}: the question has {len(self.tokens)} words {self.tokens}")
        return int(token) % len(self.tokens)

    def _layer_index(self, layer: int) -> int:
        n = len(self.guided)
        if not -n <= int(layer) < n:
            raise ConfigError(f"layer={layer}: the model has {n} guided-attention layers (0..{n - 1} or -1)")
        return int(layer) % n

    def weights(self, which: str = "flat", layer: int = -1, token: int | str | None = None) -> np.ndarray:
        """A distribution over the N cells/boxes (sums to 1).

        which="flat": AttFlat's pooling weights. which="guided": how strongly each cell attends to the
        question in decoder layer `layer`, for one word (`token`: its index or the word itself) or averaged
        over the words (token=None), normalised over the cells. The average is weighted by how much each
        word counts in the question (its AttFlat weight): each cell's guided weights sum to 1 over the
        words, so a plain mean would be 1/T everywhere and show nothing.
        """
        if which == "flat":
            w = self.flat
        elif which == "guided":
            g = self.guided[self._layer_index(layer)]
            if token is not None:
                w = g[:, self._token_index(token)]
            else:
                q = self.word_weights if self.word_weights is not None else np.ones(g.shape[1])
                w = g @ (np.asarray(q, dtype=np.float64) / max(float(np.sum(q)), 1e-12))
        else:
            raise ConfigError(f"attention={which!r}: expected one of {WHICH}")
        w = np.asarray(w, dtype=np.float64)
        total = w.sum()
        return w / total if total > 0 else np.full_like(w, 1.0 / max(len(w), 1))

    def describe(self, which: str = "flat", layer: int = -1, token: int | str | None = None) -> str:
        if which == "flat":
            return "AttFlat"
        k = self._layer_index(layer)
        words = "all words" if token is None else f"word '{self.tokens[self._token_index(token)]}'"
        return f"guided layer {k + 1}/{len(self.guided)}, {words}"

    def heatmap(
        self, which: str = "flat", layer: int = -1, token: int | str | None = None, mode: str = "bilinear"
    ) -> np.ndarray:
        """float32 [H, W]: the chosen weights over the original image (grid models)."""
        if self.grid is None:
            raise ConfigError("a region model has no heat map: its weights belong to its boxes")
        return self.grid.heatmap(self.weights(which, layer, token), mode)


def _h5_grid_geometry(
    reader: GridFeatures, grid_hw: tuple[int, int], orig_hw: tuple[int, int]
) -> GridGeometry:
    """Cell placement of a stored grid from the extractor's provenance (resize rule, output stride)."""
    from gridvqa.data.images import resize_from_text

    prov = reader.provenance
    resize, stride = str(prov.get("resize", "")), prov.get("output_stride")
    rule = resize_from_text(resize)
    resized = rule.output_size(*orig_hw) if rule is not None else None
    if resized and stride and GridGeometry.expected_grid(resized, stride) == tuple(grid_hw):
        return GridGeometry(grid_hw, orig_hw, resized, stride)
    log.warning("%s: resize rule %r / stride %r do not explain a %s grid; spreading cells evenly",
                reader.path, resize, stride, grid_hw)
    return GridGeometry.uniform(grid_hw, orig_hw)


def _forward(module: VQAModule, batch: dict) -> tuple[Any, tuple[int, ...], torch.Tensor]:
    """Run the real forward with attention; also catch what the head's visual input looked like
    (the padded map's shape and validity mask) to fold the flat weights back onto the grid."""
    seen: dict[str, Any] = {}

    def hook(_m: torch.nn.Module, args: tuple) -> None:
        seen["shape"], seen["mask"] = tuple(args[0].shape), args[1]

    handle = module.head.visual.register_forward_pre_hook(hook)
    try:
        with EvalMode(module):
            out = module(batch, return_attention=True)
    finally:
        handle.remove()
    return out, seen["shape"], seen["mask"]


@dataclass
class _VisualTokens:
    """Where the head's visual tokens sit: which of them are valid, and their place on the picture."""

    valid: Callable[[torch.Tensor], torch.Tensor]  # [N_padded, ...] -> [N_valid, ...]
    grid: GridGeometry | None = None
    boxes: np.ndarray | None = None
    box_labels: list[str] | None = None


def _region_tokens(
    inputs: QuestionBatch, vis_mask: torch.Tensor, label_names: Sequence[str] | None
) -> _VisualTokens:
    """Region models: the first n tokens are the image's boxes (the rest padding)."""
    n = int(vis_mask[0].sum())
    boxes = np.asarray(inputs.stored["boxes"], dtype=np.float32)[:n]
    return _VisualTokens(lambda x: x[:n], boxes=boxes, box_labels=_box_labels(inputs.stored, n, label_names))


def _grid_tokens(
    module: VQAModule, inputs: QuestionBatch, att: Mapping[str, Any], vis_shape: tuple[int, ...],
    orig_hw: tuple[int, int],
) -> _VisualTokens:
    """Grid models: the image's own grid, top-left in the padded map the head saw."""
    hm, wm = vis_shape[-2:]  # the padded map the head flattened row-major
    gh, gw = (int(v) for v in att["grid_hw"][0].tolist())

    def valid(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(hm, wm, *x.shape[1:])[:gh, :gw].reshape(gh * gw, *x.shape[1:])

    if inputs.resized_hw is not None:  # pixels: placed by the checkpoint's own image pipeline
        geometry = GridGeometry((gh, gw), orig_hw, inputs.resized_hw, module.stride)
    else:
        geometry = _h5_grid_geometry(inputs.reader, (gh, gw), orig_hw)
    return _VisualTokens(valid, grid=geometry)


def explain(
    model: str | Path | VQAModule,
    question: str,
    image: str | Path | Image.Image,
    *,
    features: str | Path | GridFeatures | RegionFeatures | None = None,
    image_id: int | None = None,
    question_id: int | None = None,
    gt_answers: Sequence[str] | None = None,
    topk: int = 5,
    name: str | None = None,
    label_names: Sequence[str] | None = None,
) -> Explanation:
    """Run `model` (a checkpoint path or a VQAModule) on one question about one image.

    source=pixels models read `image`; grid_h5 / region_h5 models read image `image_id` of `features`
    (their feature file) and use `image` only as the picture to draw on (sizes must agree).
    `label_names` maps region class indices to names (e.g. vg/objects_vocab.txt).
    """
    check_question(question, topk)
    pil = read_picture(image)
    module = load_model(model) if isinstance(model, (str, Path)) else model
    if name is None:
        name = Path(model).stem if isinstance(model, (str, Path)) else "model"
        name = f"{name} ({module.hparams.source})"
    inputs = question_batch(module, question, pil, features, image_id)
    out, vis_shape, vis_mask = _forward(module, inputs.batch)
    att = out.attention
    orig_hw = (pil.height, pil.width)
    if module.hparams.source == "region_h5":
        tokens = _region_tokens(inputs, vis_mask, label_names)
    else:
        tokens = _grid_tokens(module, inputs, att, vis_shape, orig_hw)
    words = inputs.words
    return Explanation(
        model_name=name,
        question=question,
        tokens=module.tokenizer.convert_ids_to_tokens(inputs.q_ids[0][words].tolist()),
        image=np.asarray(pil, dtype=np.uint8),
        flat=tokens.valid(att["v_flat"][0].float().cpu()).numpy(),
        guided=[tokens.valid(g[0].float().cpu())[:, words].numpy() for g in att["guided"]],
        top=top_answers(module, out.logits[0], topk),
        word_weights=att["q_flat"][0].float().cpu()[words].numpy(),
        grid=tokens.grid,
        boxes=tokens.boxes,
        box_labels=tokens.box_labels,
        question_id=question_id,
        gt_answers=list(gt_answers) if gt_answers else None,
    )


def _box_labels(item: Mapping[str, Any], n: int, names: Sequence[str] | None) -> list[str]:
    labels = np.asarray(item.get("labels", np.full(n, -1)))[:n]
    out = []
    for k, c in enumerate(labels.tolist()):
        if c < 0:
            out.append(f"box {k}")
        elif names is not None and c < len(names):
            out.append(str(names[c]))
        else:
            out.append(f"class {c}")
    return out


def object_names(data_root: str | Path) -> list[str] | None:
    """Region class names from the data root's vg/objects_vocab.txt, or None when it has none."""
    from gridvqa.data.vg import read_vocab

    path = layout.vg_dir(data_root) / "objects_vocab.txt"
    return read_vocab(path)[0] if path.is_file() else None


def notebook_paths() -> tuple[Path, Path]:
    """(checkpoint, data root) for notebooks: $GRIDVQA_CKPT / $GRIDVQA_DATA, else the repository's
    artifacts/e2e/model.ckpt (what `make train` writes) and data/shapes. A missing checkpoint is a
    ConfigError saying how to make one."""
    import os

    from gridvqa.config import REPO_ROOT

    ckpt = Path(os.environ.get("GRIDVQA_CKPT") or REPO_ROOT / "artifacts" / "e2e" / "model.ckpt")
    data = Path(os.environ.get("GRIDVQA_DATA") or REPO_ROOT / "data" / "shapes")
    if not ckpt.is_file():
        raise ConfigError(f"{ckpt}: no checkpoint yet; make one with `make train` in {REPO_ROOT} "
                          "(or point $GRIDVQA_CKPT at one)")
    return ckpt, data


# ---------------------------------------------------------------------------------------------------
# Questions of a split


def pick_questions(
    entries: Sequence[VQAEntry], num: int = 8, question_ids: Sequence[int] | None = None, seed: int | None = 0
) -> list[VQAEntry]:
    """The entries with `question_ids` (in that order), else `num` of them: a seeded sample kept in file
    order, or the first `num` when seed is None."""
    if question_ids:
        by_id = {e.question_id: e for e in entries}
        missing = [q for q in question_ids if int(q) not in by_id]
        if missing:
            raise ConfigError(f"question_ids {missing} are not questions of this split")
        return [by_id[int(q)] for q in question_ids]
    if int(num) < 1:
        raise ConfigError(f"num={num}: must be at least 1")
    if seed is None or num >= len(entries):
        return list(entries[: int(num)])
    keep = sorted(random.Random(seed).sample(range(len(entries)), int(num)))
    return [entries[i] for i in keep]


def explain_entry(
    model: VQAModule,
    entry: VQAEntry,
    data_root: str | Path,
    split: str,
    features: str | Path | GridFeatures | RegionFeatures | None = None,
    **kwargs: Any,
) -> Explanation:
    """`explain` on one question of a split: its COCO image under `data_root`, its human answers."""
    image = layout.coco_image_path(data_root, split, entry.image_id)
    return explain(model, entry.question, image, features=features, image_id=entry.image_id,
                   question_id=entry.question_id, gt_answers=entry.answers or None, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Drawing


def _normalized(answers: Sequence[str]) -> set[str]:
    from gridvqa.metrics.vqa_eval import normalize_answer

    return {normalize_answer(a) for a in answers}


def _gt_text(answers: Sequence[str] | None) -> str:
    if not answers:
        return "ground truth: unknown"
    from collections import Counter

    from gridvqa.metrics.vqa_eval import normalize_answer

    counts = Counter(normalize_answer(a) for a in answers).most_common()
    return "ground truth: " + ", ".join(a if c == 1 else f"{a} x{c}" for a, c in counts)


def _stretch(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """Values -> [0, 1] by min-max, so where the model looked shows even when the weights are close to
    uniform (the picture's corner note gives the real range); (zeros, True) when they are equal up to
    float noise, which a stretch would blow up into random structure."""
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 1e-4 * max(abs(hi), 1e-12):
        return np.zeros_like(x, dtype=np.float64), True
    return (x - lo) / (hi - lo), False


def draw_attention(
    ax: Axes,
    ex: Explanation,
    which: str = "flat",
    layer: int = -1,
    token: int | str | None = None,
    mode: str = "bilinear",
    cells: bool = True,
    max_labels: int = 8,
) -> None:
    """The image with the chosen attention: a heat map (grid: the image dimmed where attention is low,
    contour lines, the strongest cell outlined, cell borders faint) or boxes shaded by weight with the
    strongest `max_labels` labelled (region)."""
    img = ex.image
    h, w = img.shape[:2]
    extent = (0, w, h, 0)  # pixel edges: data coordinates are original-image pixels
    weights = ex.weights(which, layer, token)
    cmap = matplotlib.colormaps[CMAP]
    if ex.grid is not None:
        heat = ex.grid.heatmap(weights, mode)
        v, flat = _stretch(heat)
        # Dim what the model ignores instead of tinting what it looks at: the questions ask about colours,
        # so attended pixels keep theirs; contour lines (jet: blue low, red high) give the levels.
        shade = 1.0 if flat else (DIM + (1 - DIM) * v)[..., None]
        ax.imshow((img * shade).astype(np.uint8), extent=extent, interpolation="nearest")
        if not flat:
            yy, xx = np.mgrid[0:h, 0:w] + 0.5
            ax.contour(xx, yy, v, levels=CONTOURS, cmap=cmap, vmin=0, vmax=1, linewidths=1.2)
        rects = ex.grid.cell_rects()
        if cells:
            for x in np.unique(rects[:, [0, 2]]):
                ax.axvline(x, color="white", lw=0.4, alpha=0.35)
            for y in np.unique(rects[:, [1, 3]]):
                ax.axhline(y, color="white", lw=0.4, alpha=0.35)
        if not flat:
            x0, y0, x1, y1 = rects[int(np.argmax(weights))]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", lw=1.5))
    else:
        ax.imshow(img, extent=extent, interpolation="nearest")
        rel, _ = _stretch(weights)
        labels = ex.box_labels or [f"box {k}" for k in range(len(weights))]
        order = np.argsort(weights, kind="stable")  # strongest drawn last, on top
        labelled = set(order[::-1][:max_labels].tolist())
        for k in order.tolist():
            x0, y0, x1, y1 = (float(v) for v in ex.boxes[k])
            color = cmap(rel[k])
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fc=color, alpha=0.08 + 0.42 * rel[k],
                                   ec="none"))
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=color, lw=0.6 + 2.0 * rel[k]))
            if k in labelled:
                ax.text(x0 + 1, y0 + 1, f"{labels[k]} {weights[k]:.2f}", fontsize=7, va="top", ha="left",
                        color="black", bbox={"fc": color, "alpha": 0.8, "lw": 0, "pad": 1})
    ax.text(0.01, 0.01, f"max {weights.max():.2f}  (uniform {1 / len(weights):.2f})", transform=ax.transAxes,
            fontsize=7, va="bottom", ha="left", color="white", bbox={"fc": "black", "alpha": 0.5, "lw": 0})
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_answers(ax: Axes, ex: Explanation) -> None:
    """The top answers as bars (score = sigmoid probability); green where a human gave that answer."""
    answers = [a for a, _ in ex.top][::-1]
    scores = [s for _, s in ex.top][::-1]
    gt = _normalized(ex.gt_answers) if ex.gt_answers else set()
    colors = ["tab:green" if a in gt else "tab:gray" for a in answers]
    ax.barh(range(len(answers)), scores, color=colors)
    ax.set_yticks(range(len(answers)), answers, fontsize=8)
    for k, s in enumerate(scores):
        ax.text(min(s, 1.0) + 0.01, k, f"{s:.2f}", va="center", fontsize=7)
    ax.set_xlim(0, 1.15)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("score", fontsize=8)


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas, outside pyplot: nothing global is touched, no screen is needed."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _suptitle(fig: Figure, ex: Explanation) -> None:
    qid = f"question {ex.question_id}: " if ex.question_id is not None else ""
    fig.suptitle(f"{qid}{ex.question}\n{_gt_text(ex.gt_answers)}", fontsize=10)


def plot_explanations(
    explanations: Sequence[Explanation],
    which: str = "flat",
    layer: int = -1,
    token: int | str | None = None,
    mode: str = "bilinear",
) -> Figure:
    """Models side by side on the same question: attention on top, top answers below."""
    if not explanations:
        raise ConfigError("nothing to draw: no explanations given")
    n = len(explanations)
    fig = new_figure(4.4 * n, 6.4)
    gs = fig.add_gridspec(2, n, height_ratios=[4, 1.5])
    for k, ex in enumerate(explanations):
        ax = fig.add_subplot(gs[0, k])
        draw_attention(ax, ex, which, layer, token, mode)
        ax.set_title(f"{ex.model_name}\n{ex.describe(which, layer, token)}", fontsize=9)
        draw_answers(fig.add_subplot(gs[1, k]), ex)
    _suptitle(fig, explanations[0])
    return fig


def plot_layers(ex: Explanation, token: int | str | None = None, mode: str = "bilinear") -> Figure:
    """One model, every attention it has: AttFlat, then each guided-attention layer."""
    panels = [("flat", -1)] + [("guided", k) for k in range(len(ex.guided))]
    fig = new_figure(3.2 * len(panels), 3.9)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (which, layer) in zip(axes, panels, strict=True):
        draw_attention(ax, ex, which, layer, token, mode)
        ax.set_title(ex.describe(which, layer, token), fontsize=8)
    _suptitle(fig, ex)
    return fig


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_png(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write the figure as a PNG (atomically: a reader never sees half a picture)."""
    return atomic_write_bytes(path, png_bytes(fig, dpi))


# ---------------------------------------------------------------------------------------------------
# Many pictures (the CLI)


@dataclass
class ModelView:
    """A loaded model with what it reads besides pixels (its opened feature file) and a display name."""

    module: VQAModule
    features: GridFeatures | RegionFeatures | None
    name: str


def load_views(
    specs: Sequence[Mapping[str, Any]],
    device: str | torch.device | None = "cpu",
    data_root: str | Path | None = None,
    split: str | None = None,
) -> list[ModelView]:
    """[{ckpt_path, features?, name?}] -> loaded models, their feature files opened and checked. A
    feature-reading model without `features` reads extraction's default file of `split` in `data_root`
    when both are given and the file is there."""
    views = []
    for spec in specs:
        if not spec.get("ckpt_path"):
            raise ConfigError(f"a model to draw needs ckpt_path, got {dict(spec)}")
        module = load_model(spec["ckpt_path"]).to(resolve_device(device))
        source = module.hparams.source
        reader = None
        if source != "pixels":
            path = layout.split_features(spec.get("features"), data_root, source, split, spec["ckpt_path"])
            reader = open_features(path, source)
        name = spec.get("name") or f"{Path(spec['ckpt_path']).stem} ({source})"
        views.append(ModelView(module, reader, name))
    if not views:
        raise ConfigError("no model to draw: give ckpt_path=PATH")
    return views


def write_split_pictures(
    views: Sequence[ModelView],
    data_root: str | Path,
    split: str,
    out_dir: str | Path,
    num: int = 8,
    question_ids: Sequence[int] | None = None,
    seed: int | None = 0,
    which: str = "flat",
    layer: int = -1,
    token: int | str | None = None,
    topk: int = 5,
) -> list[Path]:
    """One PNG per picked question of `split`, `question_<id>.png`, every model side by side.
    A question whose image is unreadable is skipped with a warning."""
    from gridvqa.data.images import ImageError
    from gridvqa.data.vqa2 import load_split

    check_split(split)
    root = Path(data_root)
    if not root.is_dir():
        raise ConfigError(f"{root}: data root not found (set paths.data_root=DIR or $GRIDVQA_DATA)")
    if which not in WHICH:
        raise ConfigError(f"attention={which!r}: expected one of {WHICH}")
    entries = pick_questions(load_split(root, split), num, question_ids, seed)
    names = object_names(root)
    written = []
    for e in entries:
        try:
            exs = [explain_entry(v.module, e, root, split, v.features, topk=topk, name=v.name,
                                 label_names=names) for v in views]
        except ImageError as err:
            log.warning("skipping question %d: %s", e.question_id, err)
            continue
        tok = token
        if token is not None and not _has_token(exs[0], token):
            log.info("question %d has no word %r: drawing the mean over its words", e.question_id, token)
            tok = None
        fig = plot_explanations(exs, which, layer, tok)
        written.append(save_png(fig, Path(out_dir) / f"question_{e.question_id}.png"))
    if not written:
        raise DataError(f"{root}: no picture written (every picked question's image was unreadable)")
    return written


def _has_token(ex: Explanation, token: int | str) -> bool:
    if isinstance(token, str):
        return token in ex.tokens
    return -len(ex.tokens) <= int(token) < len(ex.tokens)


def write_pair_picture(
    views: Sequence[ModelView],
    image: str | Path,
    question: str,
    out_dir: str | Path,
    image_id: int | None = None,
    which: str = "flat",
    layer: int = -1,
    token: int | str | None = None,
    topk: int = 5,
    label_names: Sequence[str] | None = None,
) -> Path:
    """One PNG for one image and a question of your own: `question_custom_<words>.png`."""
    if which not in WHICH:
        raise ConfigError(f"attention={which!r}: expected one of {WHICH}")
    exs = [explain(v.module, question, image, features=v.features, image_id=image_id, topk=topk, name=v.name,
                   label_names=label_names) for v in views]
    slug = "_".join(re.findall(r"[a-z0-9]+", question.lower()))[:60] or "question"
    fig = plot_explanations(exs, which, layer, token)
    return save_png(fig, Path(out_dir) / f"question_custom_{slug}.png")
