"""Attention pictures: cell geometry on hand-made cases, a real pixels checkpoint and a real region model
(HDF5 features), the drawn pictures, the `gridvqa.visualize` CLI and the notebook run headless."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import numpy as np
import pytest
from matplotlib.patches import Rectangle
from nbclient import NotebookClient
from PIL import Image

from ckpt_utils import region_checkpoint, train_pixels_checkpoint, write_region_features
from gridvqa.config import REPO_ROOT
from gridvqa.data import layout
from gridvqa.data.features import FeatureWriter, RegionFeatures
from gridvqa.data.images import ResizeShortest
from gridvqa.data.prepare import prepare
from gridvqa.data.synthetic import generate
from gridvqa.data.vqa2 import load_split
from gridvqa.errors import ConfigError, DataError
from gridvqa.inference import TRAIN_HINT, predict
from gridvqa.lit.vqa_module import VQAModule
from gridvqa.viz import (
    Explanation,
    GridGeometry,
    draw_attention,
    explain,
    explain_entry,
    load_views,
    notebook_paths,
    object_names,
    pick_questions,
    plot_explanations,
    plot_layers,
    save_png,
)
from gridvqa.viz.attention import new_figure

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

SHORT, MAX_SIZE = 96, 128
NOTEBOOK = REPO_ROOT / "notebooks" / "attention.ipynb"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny data, a pixels checkpoint (shortest-side resize: padded, non-square grids) and a region model."""
    tmp = tmp_path_factory.mktemp("viz")
    root = tmp / "data"
    generate(root, train_images=8, val_images=4, test_images=2)
    prepare(root, min_count=1)
    ckpt, pixels = train_pixels_checkpoint(
        root, tmp, ["data.image_size=null", f"data.short={SHORT}", f"data.max_size={MAX_SIZE}"]
    )
    features = write_region_features(root, "val", tmp / "region_val.h5")
    region_ckpt, region = region_checkpoint(root, tmp / "region.ckpt")
    entries = load_split(root, "val")
    return SimpleNamespace(root=root, ckpt=ckpt, pixels=pixels, features=features, region_ckpt=region_ckpt,
                           region=region, entries=entries)


def _inside(x: float, y: float, rect) -> bool:
    x0, y0, x1, y1 = rect
    return x0 <= x < x1 and y0 <= y < y1


def _centres_inside(rect, h: int, w: int) -> np.ndarray:
    """Pixels whose centre lies in [x0, x1) x [y0, y1)."""
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    x0, y0, x1, y1 = rect
    return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]


def _one_hot(geo: GridGeometry, r: int, c: int) -> np.ndarray:
    w = np.zeros(geo.num_cells)
    w[r * geo.grid_hw[1] + c] = 1.0
    return w


# -- geometry, by hand ------------------------------------------------------------------------------


def test_fixed_resize_cell_lights_up_its_original_rectangle():
    W, H = 300, 200  # a 300x200 image seen at 224x224: 7x7 cells of 32 px
    geo = GridGeometry((7, 7), (H, W), (224, 224), 32)
    for r, c in [(2, 5), (0, 0), (6, 6), (5, 1)]:
        rect = (c * 32 * W / 224, r * 32 * H / 224, (c + 1) * 32 * W / 224, (r + 1) * 32 * H / 224)
        assert geo.cell_rect(r, c) == pytest.approx(rect)
        assert geo.cell_rects()[r * 7 + c] == pytest.approx(rect)
        for mode in ("bilinear", "nearest"):
            heat = geo.heatmap(_one_hot(geo, r, c), mode)
            assert heat.shape == (H, W)
            y, x = np.unravel_index(np.argmax(heat), heat.shape)
            assert _inside(x + 0.5, y + 0.5, rect), (r, c, mode, x, y)
        hot = geo.heatmap(_one_hot(geo, r, c), "nearest") == 1.0
        assert np.array_equal(hot, _centres_inside(rect, H, W))  # exactly the cell, nothing else


def test_shortest_side_padding_maps_only_valid_cells_the_last_partially():
    H, W = 170, 250
    resized = ResizeShortest(100, 1000).output_size(H, W)
    assert resized == (100, 147)
    grid = GridGeometry.expected_grid(resized, 32)
    assert grid == (4, 5)  # ceil(100/32) x ceil(147/32); the padded map would be 4x5 too, 128x160 pixels
    geo = GridGeometry(grid, (H, W), resized, 32)
    rects = geo.cell_rects()
    # the cells tile the image exactly: last row/column end at the image border, not at 128/160 px
    assert rects[:, 2].max() == pytest.approx(W) and rects[:, 3].max() == pytest.approx(H)
    assert ((rects[:, 2] - rects[:, 0]) * (rects[:, 3] - rects[:, 1])).sum() == pytest.approx(H * W)
    last = geo.cell_rect(3, 4)
    assert last == pytest.approx((128 * W / 147, 96 * H / 100, W, H))
    assert last[3] - last[1] == pytest.approx(4 * H / 100)  # 4 of the cell's 32 rows are real pixels
    for r, c in [(3, 4), (0, 4), (3, 0), (1, 2)]:
        rect = geo.cell_rect(r, c)
        for mode in ("bilinear", "nearest"):
            heat = geo.heatmap(_one_hot(geo, r, c), mode)
            y, x = np.unravel_index(np.argmax(heat), heat.shape)
            assert _inside(x + 0.5, y + 0.5, rect), (r, c, mode)
        assert np.array_equal(geo.heatmap(_one_hot(geo, r, c), "nearest") == 1.0, _centres_inside(rect, H, W))
    with pytest.raises(ConfigError, match="does not fit"):
        GridGeometry((5, 5), (H, W), resized, 32)  # a 5th row would be all padding
    with pytest.raises(ConfigError, match="21 attention weights for a 4x5 grid"):
        geo.heatmap(np.ones(21))


def test_drawn_heat_map_sits_on_the_cell_in_the_picture():
    """Render the picture itself (axes filling the figure, 1 px per image pixel) and find the hot region."""
    H, W = 120, 200
    geo = GridGeometry((3, 4), (H, W), (96, 128), 32)  # cell = 50x40 original pixels
    r, c = 1, 2
    ex = Explanation("hand", "q", ["q"], np.full((H, W, 3), 128, np.uint8), _one_hot(geo, r, c), [],
                     [("a", 1.0)], grid=geo)
    fig = new_figure(W / 100, H / 100)
    fig.set_layout_engine("none")
    ax = fig.add_axes((0, 0, 1, 1))
    draw_attention(ax, ex, mode="nearest", cells=False)
    for note in list(ax.texts):  # the corner note (white text) is not part of the map
        note.remove()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    assert rgb.shape[:2] == (H, W)
    hot = rgb.max(axis=-1) > 90  # the attended cell keeps the image's grey 128; the rest is dimmed to ~38
    ys, xs = np.nonzero(hot)
    x0, y0, x1, y1 = geo.cell_rect(r, c)
    assert (x0, y0, x1, y1) == (100, 40, 150, 80)
    assert abs(xs.min() - x0) <= 2 and abs(xs.max() + 1 - x1) <= 2
    assert abs(ys.min() - y0) <= 2 and abs(ys.max() + 1 - y1) <= 2
    outline = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in outline] == [(100, 40, 50, 40)]


# -- a real pixels checkpoint -----------------------------------------------------------------------


def test_explain_pixels_checkpoint_shapes_and_sums(world):
    e = world.entries[0]
    image = layout.coco_image_path(world.root, "val", e.image_id)
    ex = explain(world.ckpt, e.question, image, question_id=e.question_id, gt_answers=e.answers)
    with Image.open(image) as im:
        W, H = im.size
    assert ex.image.shape == (H, W, 3) and ex.kind == "grid"
    resized = ResizeShortest(SHORT, MAX_SIZE).output_size(H, W)
    assert ex.grid.resized_hw == resized and ex.grid.orig_hw == (H, W)
    gh, gw = ex.grid.grid_hw
    assert (gh, gw) == (math.ceil(resized[0] / 32), math.ceil(resized[1] / 32))
    n = gh * gw
    assert ex.flat.shape == (n,) and ex.flat.sum() == pytest.approx(1.0, abs=1e-5) and (ex.flat > 0).all()
    words = e.question.lower().rstrip("?").split()
    assert len(ex.tokens) == len(words)
    assert len(ex.guided) == world.pixels.head.cfg.layers
    assert all(g.shape == (n, len(words)) for g in ex.guided)
    for which, layer, token in [("flat", -1, None), ("guided", 0, None), ("guided", -1, 1),
                                ("guided", 1, ex.tokens[0])]:
        w = ex.weights(which, layer, token)
        assert w.shape == (n,) and w.sum() == pytest.approx(1.0) and (w >= 0).all()
        assert ex.heatmap(which, layer, token).shape == (H, W)
    assert ex.describe("guided", 0, ex.tokens[0]) == f"guided layer 1/2, word '{ex.tokens[0]}'"
    # each cell's guided weights sum to 1 over the words: a plain mean over words would be flat, so the
    # all-words view weights each word by the question's AttFlat weight
    assert ex.word_weights.shape == (len(words),) and ex.word_weights.sum() == pytest.approx(1.0, abs=1e-5)
    g = ex.guided[-1]
    assert g.sum(axis=1) == pytest.approx(np.ones(n), abs=1e-5)
    mixed = g @ ex.word_weights
    assert ex.weights("guided") == pytest.approx(mixed / mixed.sum(), abs=1e-6)
    assert ex.weights("guided", -1, 1) == pytest.approx(g[:, 1] / g[:, 1].sum(), abs=1e-6)
    # the answers are the model's: the same as `predict` gives
    top = predict(world.pixels, image, e.question, topk=5)
    assert [a for a, _ in ex.top] == [a for a, _ in top]
    assert [s for _, s in ex.top] == pytest.approx([s for _, s in top], abs=1e-5)
    with pytest.raises(ConfigError, match="layer=2: the model has 2 guided-attention layers"):
        ex.weights("guided", 2)
    with pytest.raises(ConfigError, match="token='zebra' is not a word"):
        ex.weights("guided", -1, "zebra")
    with pytest.raises(ConfigError, match="attention='self'"):
        ex.weights("self")


def test_padded_feature_map_folds_back_onto_the_valid_cells(world):
    # Padding every input to 128 px makes the head's map larger than the image's grid: the flat weights
    # must be read row-major in the *map*; all of AttFlat's mass is on valid cells (padding gets 0).
    e = world.entries[1]
    image = layout.coco_image_path(world.root, "val", e.image_id)
    world.pixels.size_divisibility = 128
    try:
        ex = explain(world.pixels, e.question, image)
    finally:
        world.pixels.size_divisibility = 32
    assert ex.grid.grid_hw[0] < 4 or ex.grid.grid_hw[1] < 4  # a 4x4 map, a smaller grid
    assert ex.flat.size == ex.grid.num_cells
    assert ex.flat.sum() == pytest.approx(1.0, abs=1e-5) and (ex.flat > 0).all()


def test_a_picture_in_memory_is_read_as_its_file(world, tmp_path):
    # explain and predict share one reading of the picture: transparent pixels of an in-memory image are
    # white, as when its file is decoded, so the drawn image is what the model saw
    e = world.entries[0]
    with Image.open(layout.coco_image_path(world.root, "val", e.image_id)) as im:
        rgba = im.convert("RGBA")
    alpha = np.array(rgba.getchannel("A"))
    alpha[: rgba.height // 2, : rgba.width // 2] = 0
    rgba.putalpha(Image.fromarray(alpha))
    path = tmp_path / "rgba.png"
    rgba.save(path)
    in_memory, from_file = explain(world.pixels, e.question, rgba), explain(world.pixels, e.question, path)
    assert np.array_equal(in_memory.image, from_file.image) and (in_memory.image[0, 0] == 255).all()
    assert np.array_equal(in_memory.flat, from_file.flat) and in_memory.top == from_file.top
    top = predict(world.pixels, rgba, e.question)  # without attention weights: float noise apart
    assert [a for a, _ in top] == [a for a, _ in in_memory.top]
    assert [s for _, s in top] == pytest.approx([s for _, s in in_memory.top], abs=1e-5)


def test_layers_picture_is_written(world, tmp_path):
    e = world.entries[0]
    ex = explain_entry(world.pixels, e, world.root, "val")
    path = save_png(plot_layers(ex), tmp_path / "layers.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 2 * im.height  # AttFlat + 2 guided layers in a row


# -- a region model on a real HDF5 feature file -----------------------------------------------------


def test_region_model_boxes_in_image_pixels_and_side_by_side(world, tmp_path):
    e = world.entries[2]
    names = object_names(world.root)
    ex = explain_entry(world.region, e, world.root, "val", world.features, label_names=names)
    stored = RegionFeatures(world.features).get(e.image_id)
    H, W = ex.image.shape[:2]
    assert ex.kind == "region" and tuple(stored["image_size"]) == (H, W)
    assert np.array_equal(ex.boxes, stored["boxes"])
    assert (ex.boxes[:, 0] >= 0).all() and (ex.boxes[:, 2] <= W).all() and (ex.boxes[:, 3] <= H).all()
    assert (ex.boxes[:, :2] < ex.boxes[:, 2:]).all()
    assert ex.flat.shape == (len(ex.boxes),) and ex.flat.sum() == pytest.approx(1.0, abs=1e-5)
    assert ex.box_labels == [names[c] for c in stored["labels"]]
    assert ex.weights("guided", 0, None).sum() == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="region model has no heat map"):
        ex.heatmap()
    # boxes are drawn where they are, in original-image pixels
    fig = new_figure(4, 4)
    ax = fig.add_subplot()
    draw_attention(ax, ex)
    drawn = {(p.get_x(), p.get_y(), p.get_x() + p.get_width(), p.get_y() + p.get_height())
             for p in ax.patches}
    assert drawn == {tuple(float(v) for v in b) for b in ex.boxes}
    # grid and region models on the same question, side by side
    grid_ex = explain_entry(world.pixels, e, world.root, "val")
    one = save_png(plot_explanations([grid_ex]), tmp_path / "one.png")
    two = save_png(plot_explanations([grid_ex, ex]), tmp_path / "two.png")
    with Image.open(one) as a, Image.open(two) as b:
        assert b.width > 1.8 * a.width and b.height == a.height


def test_region_model_needs_its_features_and_the_same_image(world, tmp_path):
    e = world.entries[0]
    image = layout.coco_image_path(world.root, "val", e.image_id)
    with pytest.raises(ConfigError, match="reads region_h5 features"):
        explain(world.region, e.question, image)
    other = tmp_path / "other.jpg"
    with Image.open(image) as im:
        im.resize((im.width + 10, im.height)).save(other)
    with pytest.raises(DataError, match=f"{world.features}: image {e.image_id} is .* not the same image"):
        explain(world.region, e.question, other, features=world.features, image_id=e.image_id)
    with pytest.raises(DataError, match="image 999999 is not in the feature file"):
        explain(world.region, e.question, image, features=world.features, image_id=999999)


def test_grid_h5_model_places_stored_cells_by_the_extractor_resize_rule(world, tmp_path, caplog):
    e = world.entries[0]
    image = layout.coco_image_path(world.root, "val", e.image_id)
    with Image.open(image) as im:
        W, H = im.size
    module = VQAModule(source="grid_h5", visual_dim=8, head={"size": "tiny"}, answers=world.pixels.answers,
                       tokenizer_json=world.pixels.hparams.tokenizer_json)
    rng = np.random.default_rng(0)
    for prov, resized in [({"resize": "fixed 64x96", "output_stride": 32}, (64, 96)), ({}, None)]:
        path = tmp_path / f"grid{len(prov)}.h5"
        with FeatureWriter(path, "grid", prov, dtype="float32") as w:
            w.add_grid(e.image_id, rng.standard_normal((2, 3, 8)).astype(np.float32), (H, W))
        ex = explain(module, e.question, image, features=path, image_id=e.image_id)
        assert ex.grid.grid_hw == (2, 3) and ex.flat.sum() == pytest.approx(1.0, abs=1e-5)
        if resized:
            assert ex.grid == GridGeometry((2, 3), (H, W), resized, 32)
        else:  # no resize rule recorded: the cells are spread evenly, and the log says so
            assert ex.grid == GridGeometry.uniform((2, 3), (H, W)) and "spreading cells evenly" in caplog.text
        assert ex.grid.cell_rect(1, 2) == pytest.approx((2 * W / 3, H / 2, W, H))


# -- choosing questions, notebook paths -------------------------------------------------------------


def test_pick_questions(world):
    es = world.entries
    assert [e.question_id for e in pick_questions(es, 3, seed=None)] == [e.question_id for e in es[:3]]
    picked = pick_questions(es, 3, seed=0)
    assert picked == pick_questions(es, 3, seed=0) and len({e.question_id for e in picked}) == 3
    order = [es.index(e) for e in picked]
    assert order == sorted(order)
    ids = [es[5].question_id, es[1].question_id]
    assert [e.question_id for e in pick_questions(es, 1, ids)] == ids
    with pytest.raises(ConfigError, match=r"question_ids \[12345\]"):
        pick_questions(es, 1, [12345])


def test_notebook_paths_say_how_to_make_a_missing_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDVQA_CKPT", str(tmp_path / "none.ckpt"))
    with pytest.raises(ConfigError, match=r"none.ckpt: no checkpoint yet; make one with `make train`"):
        notebook_paths()
    monkeypatch.delenv("GRIDVQA_CKPT")
    monkeypatch.setenv("GRIDVQA_DATA", str(tmp_path))
    if (REPO_ROOT / "artifacts" / "e2e" / "model.ckpt").is_file():
        assert notebook_paths() == (REPO_ROOT / "artifacts" / "e2e" / "model.ckpt", tmp_path)
    else:
        with pytest.raises(ConfigError, match=r"artifacts/e2e/model.ckpt: no checkpoint yet"):
            notebook_paths()


# -- the CLI and the notebook -----------------------------------------------------------------------


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gridvqa.visualize", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def test_cli_writes_one_png_per_question_with_a_region_model_beside(world, tmp_path):
    out = tmp_path / "pics"
    compare = f"compare=[{{ckpt_path:'{world.region_ckpt}',features:'{world.features}'}}]"
    r = _run(f"ckpt_path={world.ckpt}", f"paths.data_root={world.root}", f"paths.log_dir={tmp_path / 'logs'}",
             "split=val", "num=2", f"out={out}", compare, "attention=guided", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    want = {f"question_{e.question_id}.png" for e in pick_questions(world.entries, 2, seed=0)}
    assert {p.name for p in out.iterdir()} == want
    assert {Path(line).name for line in r.stdout.split()} == want
    for p in out.iterdir():
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > im.height  # two models side by side


def test_cli_own_image_and_question_and_errors(world, tmp_path):
    e = world.entries[0]
    image = layout.coco_image_path(world.root, "val", e.image_id)
    r = _run(f"ckpt_path={world.ckpt}", f"paths.log_dir={tmp_path / 'logs'}", f"image={image}",
             "question=what color is the circle?", f"out={tmp_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "question_custom_what_color_is_the_circle.png").is_file()
    r = _run(f"ckpt_path={world.ckpt}", f"paths.log_dir={tmp_path / 'logs'}", f"image={image}", cwd=tmp_path)
    assert r.returncode == 1  # one line, no traceback
    want = 'error: give both image=PATH and question="..." (or neither, to draw a split)'
    assert r.stderr.strip().splitlines()[-1] == want


def test_load_views_needs_the_feature_file_of_a_region_model(world, tmp_path):
    with pytest.raises(ConfigError, match=f"none.ckpt: checkpoint not found \\(train one with: {TRAIN_HINT}"):
        load_views([{"ckpt_path": tmp_path / "none.ckpt"}])
    with pytest.raises(ConfigError, match=f"{world.region_ckpt}: this checkpoint reads region_h5 features"):
        load_views([{"ckpt_path": world.region_ckpt}])
    specs = [{"ckpt_path": world.ckpt}, {"ckpt_path": world.region_ckpt, "features": world.features}]
    views = load_views(specs)
    assert [v.name for v in views] == ["pixels (pixels)", "region (region_h5)"]
    assert views[0].features is None and views[1].features.path == world.features
    # a split's pictures: the feature file where extraction writes it by default
    default = tmp_path / "features" / "region_val.h5"
    make = "python -m gridvqa.extract kind=region split=val"
    want = f"{default}: not found; {world.region_ckpt} reads region_h5 .*{make}"
    with pytest.raises(ConfigError, match=want):
        load_views([{"ckpt_path": world.region_ckpt}], data_root=tmp_path, split="val")
    default.parent.mkdir()
    shutil.copyfile(world.features, default)
    views = load_views([{"ckpt_path": world.region_ckpt}], data_root=tmp_path, split="val")
    assert views[0].features.path == default


def test_notebook_runs_headless_on_a_tiny_checkpoint(world, tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDVQA_CKPT", str(world.ckpt))
    monkeypatch.setenv("GRIDVQA_DATA", str(world.root))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored clean
    assert any("question = " in c.source for c in nb.cells if c.cell_type == "code")
    client = NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 4 + 1 + 2  # 4 validation questions, every layer of one, two of your own
    assert any(str(world.ckpt) in o.get("text", "") for o in outputs)
