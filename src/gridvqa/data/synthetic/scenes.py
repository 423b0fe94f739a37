"""Scenes: objects placed without overlap, questions added answer-first, and the JPEG rendering with
each object's tight box."""

from __future__ import annotations

import colorsys
import io
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from gridvqa.data.synthetic.objects import COLORS, DOMAINS, SIZE_FRACTION, Obj, Place, State
from gridvqa.data.synthetic.templates import TEMPLATES, Template

JPEG_QUALITY = 90


# ----------------------------------------------------------------------------------------------
# Scenes


@dataclass
class Question:
    template: Template
    params: dict
    text: str
    answer: str


@dataclass
class Scene:
    width: int
    height: int
    geo: list[Place]
    objs: list[Obj]
    questions: list[Question]


def _place_objects(rng: np.random.Generator, w: int, h: int, max_objects: int) -> list[Place]:
    """Rejection sampling at the largest radius, so any size assigned later never overlaps."""
    r = SIZE_FRACTION["large"][1] * min(w, h)
    gap = 0.03 * min(w, h)
    want = int(rng.integers(1, max_objects + 1))
    geo: list[Place] = []
    for _ in range(want):
        for _try in range(60):
            x = float(rng.uniform(r + 2, w - r - 2))
            y = float(rng.uniform(r + 2, h - r - 2))
            if all(math.hypot(x - g.x, y - g.y) >= 2 * r + gap for g in geo):
                geo.append(Place(x, y, r))
                break
        else:
            break
    return geo


def make_scene(rng: np.random.Generator, counts: dict[str, Counter], questions_per_image: int,
               min_side: int, max_side: int, max_objects: int) -> Scene:
    """Place objects, add questions answer-first (least-used answer of each string), fix attributes."""
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    geo = _place_objects(rng, w, h, max_objects)
    state: State = [{k: frozenset(v) for k, v in DOMAINS.items()} for _ in geo]
    weights = np.array([t.weight for t in TEMPLATES])
    weights = weights / weights.sum()
    chosen: list[Question] = []
    used: set[str] = set()
    for _slot in range(2 * questions_per_image):
        if len(chosen) >= questions_per_image:
            break
        # The template is drawn once per slot and retried with new parameters, so the family mix follows
        # the weights instead of drifting to the families that are easiest to realise.
        tmpl = TEMPLATES[int(rng.choice(len(TEMPLATES), p=weights))]
        for _try in range(10):
            p = tmpl.params(rng)
            text = tmpl.text(p)
            if text in used:
                continue
            # Strictly answer-first: one of this string's least-used answers, drawn without looking at
            # the scene; if the scene cannot have it, the question is dropped. Falling back to an answer
            # the scene allows would favour easy answers (count 0, "no") and hand a blind model a prior.
            seen = counts[text]
            domain = tmpl.domain(p)
            least = min(seen[a] for a in domain)
            tied = [a for a in domain if seen[a] == least]
            ans = tied[int(rng.integers(len(tied)))]
            t = tmpl.realise(state, geo, p, ans, rng)
            if t is None:
                continue
            state = t
            seen[ans] += 1
            used.add(text)
            chosen.append(Question(tmpl, p, text, ans))
            break
    objs = [{k: sorted(a[k])[int(rng.integers(len(a[k])))] for k in DOMAINS} for a in state]
    for q in chosen:
        got = q.template.truth(objs, geo, q.params)
        if got != q.answer:  # the solver only narrows, so this is a bug, never bad input
            raise RuntimeError(f"internal error: {q.text!r} should be {q.answer!r}, scene says {got!r}")
    return Scene(w, h, geo, objs, chosen)


# ----------------------------------------------------------------------------------------------
# Rendering


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.deg2rad([45, 135, 225, 315])]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(a), (1.0 if k % 2 == 0 else 0.45) * math.sin(a))
               for k, a in enumerate(np.deg2rad(np.arange(10) * 36 - 90))]
    elif shape == "cross":
        u, v = 0.3, 0.95  # arm half-width and length, scaled to fit inside the radius
        pts = [(-u, -v), (u, -v), (u, -u), (v, -u), (v, u), (u, u), (u, v), (-u, v), (-u, u), (-v, u),
               (-v, -u), (-u, -u)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (px * c - py * s), cy + r * (px * s + py * c)) for px, py in pts]


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Desaturated base colour + low-frequency blotches + stripes or checks: texture, not object colours."""
    base = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.2), rng.uniform(0.35, 0.8))) * 255
    cell = int(rng.integers(12, 40))
    sigma = rng.uniform(8, 22)
    # Mostly brightness blotches with a little colour: strong colour noise would compete with the objects.
    coarse = rng.normal(0.0, sigma, size=(h // cell + 2, w // cell + 2, 1))
    coarse = coarse + rng.normal(0.0, 0.4 * sigma, size=coarse.shape[:2] + (3,))
    blotch = np.asarray(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
        (w, h), Image.BICUBIC), dtype=np.float32) - 128.0
    x = np.arange(w, dtype=np.float32)
    y = np.arange(h, dtype=np.float32)
    kind = int(rng.integers(3))
    period = rng.uniform(6, 24)
    amp = rng.uniform(4, 14)
    out = blotch
    out += base.astype(np.float32)
    # Separable forms (outer products) of the 2-D patterns: several times faster than on a full grid.
    if kind == 0:  # stripes at angle theta: sin(ax + by) = sin(ax)cos(by) + cos(ax)sin(by)
        theta = rng.uniform(0, math.pi)
        ax, by = 2 * math.pi * math.cos(theta) / period * x, 2 * math.pi * math.sin(theta) / period * y
        texture = np.outer(np.cos(by), np.sin(ax)) + np.outer(np.sin(by), np.cos(ax))
        out += (amp * texture)[..., None]
    elif kind == 1:  # checks
        texture = np.outer(np.sign(np.sin(math.pi * y / period)), np.sign(np.sin(math.pi * x / period)))
        out += (amp * texture)[..., None]
    return out


def render(scene: Scene, rng: np.random.Generator) -> tuple[bytes, list[tuple[int, int, int, int]]]:
    """JPEG bytes and each object's tight box (x, y, w, h) in pixels, from the drawn mask."""
    w, h = scene.width, scene.height
    bg = _background(rng, w, h)
    img = Image.fromarray(np.clip(bg, 0, 255, out=bg).astype(np.uint8))
    boxes = []
    short = min(w, h)
    for g, o in zip(scene.geo, scene.objs, strict=True):
        r = rng.uniform(*SIZE_FRACTION[o["size"]]) * short
        angle = math.radians(rng.uniform(-12, 12))
        x0, y0 = max(int(g.x - r) - 2, 0), max(int(g.y - r) - 2, 0)
        mask = Image.new("L", (int(2 * r) + 6, int(2 * r) + 6), 0)
        draw = ImageDraw.Draw(mask)
        lx, ly = g.x - x0, g.y - y0
        if o["shape"] == "circle":
            draw.ellipse([lx - r, ly - r, lx + r, ly + r], fill=255)
        else:
            draw.polygon(_shape_points(o["shape"], lx, ly, r, angle), fill=255)
        bx0, by0, bx1, by1 = mask.getbbox()
        boxes.append((x0 + bx0, y0 + by0, bx1 - bx0, by1 - by0))
        colour = np.clip(np.array(COLORS[o["color"]]) + rng.integers(-15, 16, size=3), 0, 255)
        img.paste(Image.new("RGB", mask.size, tuple(int(c) for c in colour)), (x0, y0), mask)
    noise = rng.standard_normal(size=(h, w, 3), dtype=np.float32)
    noise *= rng.uniform(3, 8)
    noise += np.asarray(img, dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noise, 0, 255, out=noise).astype(np.uint8)).save(
        buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4 keeps small objects' colour
    return buf.getvalue(), boxes
