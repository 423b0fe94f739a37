"""The built-in synthetic "shapes" data set, written in the official VQA v2 / COCO / Visual Genome layout.

    python -m gridvqa.data.synthetic OUT_DIR [--train-images N] [--val-images N] [--test-images N] [--seed S]

Simple objects (6 shapes x 7 colours x 2 sizes, 1-6 per image, never overlapping) on textured, noisy
backgrounds, as JPEG images of varied size and aspect ratio (sides 160-320 px). Questions ask about
colour, shape, counts, existence, size and relative position, each with ten human-like answers
(case, punctuation, articles, number words, ~5 % wrong) so that the official normalisation matters.

Balance: for every exact question string the answer is chosen first (the least used so far for that
string in this split) and the scene is then made to have it, so a question-only model learns little;
the blind prior is measured on val and written to stats.json. Object attributes are kept as sets of
allowed values while questions are added; a question only narrows those sets, so the answers of
earlier questions stay true, and every answer is re-checked on the final scene.

Visual Genome files (image_data / objects / attributes json, vocab files, VG_100K images hard-linked
to the COCO files) cover the train2014 images only, with VG image_id == coco_id: val stays out of
detector pre-training, as in the real recipe.

Hand-written on numpy + PIL: no library makes VQA-format synthetic scenes with answer-first balance.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import math
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from gridvqa.data import layout
from gridvqa.data.jsonio import atomic_write_bytes, atomic_write_json, atomic_write_text
from gridvqa.errors import DataError, GridVQAError
from gridvqa.metrics.vqa_eval import normalize_answer, vqa_accuracy

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (235, 215, 30),
    "green": (40, 165, 55),
    "cyan": (30, 200, 215),
    "blue": (40, 75, 225),
    "purple": (145, 55, 195),
}
SIZES: tuple[str, ...] = ("small", "large")
# Object radius as a fraction of the image's shorter side: relative, so "large" survives any resize.
# The gap between the ranges (ratio >= 1.6) keeps small/large unambiguous.
SIZE_FRACTION = {"small": (0.05, 0.065), "large": (0.105, 0.13)}
DOMAINS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES}
ATTR_ORDER = ("size", "color", "shape")  # word order in a noun phrase: "small red circle"

SPLITS = ("train2014", "val2014", "test2015")
ANNOTATED = ("train2014", "val2014")
NUM_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
YES_NO = ("yes", "no")
WRONG_RATE = 0.05  # share of human answers that are plain wrong
MAX_WRONG = 3  # per question, so the true answer always keeps the majority
VARIANT_RATE = 0.35  # share of correct human answers typed another (normalisable) way
JPEG_QUALITY = 90
# Question types as VQA v2 names them (prefixes), longest match wins.
QUESTION_TYPES = (
    "what color is the", "what shape is the", "what size is the", "what is the", "how many",
    "is there a", "is there", "is the",
)

Desc = tuple[tuple[str, str], ...]  # ((attribute, value), ...), e.g. (("color", "red"), ("shape", "circle"))
State = list[dict[str, frozenset[str]]]  # per object: the values each attribute may still take
Obj = dict[str, str]  # a finished object's attributes


@dataclass(frozen=True)
class Place:
    x: float
    y: float
    r: float  # room reserved around the centre: the largest radius the object may get


# ----------------------------------------------------------------------------------------------
# Phrases and descriptions


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("ss") or shape.endswith("x") else "s")


def noun_phrase(desc: Desc, plural: bool = False) -> str:
    """'small red circle', 'red objects', 'crosses' ..."""
    d = dict(desc)
    words = [d[k] for k in ATTR_ORDER[:2] if k in d]
    if "shape" in d:
        words.append(_plural(d["shape"]) if plural else d["shape"])
    else:
        words.append("objects" if plural else "object")
    return " ".join(words)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def question_type(question: str) -> str:
    words = question.lower().rstrip("?").split()
    for qt in sorted(QUESTION_TYPES, key=len, reverse=True):
        t = qt.split()
        if words[: len(t)] == t:
            return qt
    return " ".join(words[:3])


def _sample_desc(rng: np.random.Generator, kinds: Sequence[tuple[str, ...]]) -> Desc:
    kind = kinds[int(rng.integers(len(kinds)))]
    return tuple((k, DOMAINS[k][int(rng.integers(len(DOMAINS[k])))]) for k in ATTR_ORDER if k in kind)


def _matches(obj: Obj, desc: Desc) -> bool:
    return all(obj[k] == v for k, v in desc)


def _unique_index(objs: Sequence[Obj], desc: Desc) -> int | None:
    hits = [i for i, o in enumerate(objs) if _matches(o, desc)]
    return hits[0] if len(hits) == 1 else None


# ----------------------------------------------------------------------------------------------
# The attribute solver: constraints only ever narrow the allowed sets.


def _can_match(a: dict[str, frozenset[str]], desc: Desc) -> bool:
    return all(v in a[k] for k, v in desc)


def _force(a: dict[str, frozenset[str]], desc: Desc) -> bool:
    if not _can_match(a, desc):
        return False
    for k, v in desc:
        a[k] = frozenset((v,))
    return True


def _exclude(a: dict[str, frozenset[str]], desc: Desc, rng: np.random.Generator) -> bool:
    """Make the object unable to match `desc` by removing one of its values (a sufficient condition)."""
    if not _can_match(a, desc):
        return True
    keys = [k for k, _ in desc if len(a[k]) > 1]
    if not keys:
        return False
    k = keys[int(rng.integers(len(keys)))]
    a[k] = a[k] - {dict(desc)[k]}
    return True


def _unique(s: State, desc: Desc, i: int, rng: np.random.Generator) -> bool:
    return _force(s[i], desc) and all(_exclude(s[j], desc, rng) for j in range(len(s)) if j != i)


def _copy(s: State) -> State:
    return [dict(a) for a in s]


# ----------------------------------------------------------------------------------------------
# Geometry: "clearly" means the horizontal (vertical) extents do not overlap, even at full size.

OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def _clearly(geo: Sequence[Place], i: int, j: int, rel: str) -> bool:
    """Object i is clearly `rel` of object j."""
    a, b = geo[i], geo[j]
    m = a.r + b.r
    if rel == "left":
        return a.x + m < b.x
    if rel == "right":
        return a.x > b.x + m
    if rel == "above":
        return a.y + m < b.y
    return a.y > b.y + m


EXTREME_REL = {"leftmost": "left", "rightmost": "right", "topmost": "above", "bottommost": "below"}


def _extreme(geo: Sequence[Place], which: str) -> int | None:
    rel = EXTREME_REL[which]
    if len(geo) < 2:
        return None
    for i in range(len(geo)):
        if all(_clearly(geo, i, j, rel) for j in range(len(geo)) if j != i):
            return i
    return None


# ----------------------------------------------------------------------------------------------
# Question templates. Each: params(rng) -> p, text(p), domain(p), answer_type(p),
# realise(state, geo, p, answer, rng) -> narrowed state or None, truth(objs, geo, p) -> answer.

REF_KINDS = (("shape",), ("color",), ("color", "shape"))


class Template:
    family = ""
    weight = 0.0

    def params(self, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def text(self, p: dict) -> str:
        raise NotImplementedError

    def domain(self, p: dict) -> tuple[str, ...]:
        raise NotImplementedError

    def answer_type(self, p: dict) -> str:
        return "other"

    def all_answers(self) -> set[str]:
        """Every answer any parameters can have (for the vocabulary in stats.json)."""
        return set(YES_NO)

    def realise(self, s: State, geo: Sequence[Place], p: dict, ans: str,
                rng: np.random.Generator) -> State | None:
        raise NotImplementedError

    def truth(self, objs: Sequence[Obj], geo: Sequence[Place], p: dict) -> str | None:
        raise NotImplementedError


class AttributeOf(Template):
    """'What color is the circle?', 'What shape is the small red object?', 'What size is the star?'"""

    def __init__(self, family: str, attr: str, kinds: Sequence[tuple[str, ...]], wordings: Sequence[str],
                 weight: float) -> None:
        self.family, self.attr, self.kinds, self.wordings, self.weight = family, attr, kinds, wordings, weight

    def params(self, rng):
        return {"ref": _sample_desc(rng, self.kinds), "w": int(rng.integers(len(self.wordings)))}

    def text(self, p):
        return self.wordings[p["w"]].format(noun_phrase(p["ref"]))

    def domain(self, p):
        return DOMAINS[self.attr]

    def all_answers(self):
        return set(DOMAINS[self.attr])

    def realise(self, s, geo, p, ans, rng):
        for i in rng.permutation(len(s)):
            t = _copy(s)
            if _force(t[i], ((self.attr, ans),)) and _unique(t, p["ref"], int(i), rng):
                return t
        return None

    def truth(self, objs, geo, p):
        i = _unique_index(objs, p["ref"])
        return None if i is None else objs[i][self.attr]


class SizeYesNo(Template):
    """'Is the red circle large?'"""

    family, weight = "size", 0.02

    def params(self, rng):
        return {"ref": _sample_desc(rng, REF_KINDS), "size": SIZES[int(rng.integers(2))]}

    def text(self, p):
        return f"Is the {noun_phrase(p['ref'])} {p['size']}?"

    def domain(self, p):
        return YES_NO

    def answer_type(self, p):
        return "yes/no"

    def realise(self, s, geo, p, ans, rng):
        size = p["size"] if ans == "yes" else next(z for z in SIZES if z != p["size"])
        for i in rng.permutation(len(s)):
            t = _copy(s)
            if _force(t[i], (("size", size),)) and _unique(t, p["ref"], int(i), rng):
                return t
        return None

    def truth(self, objs, geo, p):
        i = _unique_index(objs, p["ref"])
        return None if i is None else ("yes" if objs[i]["size"] == p["size"] else "no")


class Count(Template):
    """'How many red objects are there?' -> 0..4 (0..3 for two-attribute descriptions)."""

    family, weight = "count", 0.24
    kinds = (("shape",), ("color",), ("color", "shape"), ("size", "shape"))

    def params(self, rng):
        return {"ref": _sample_desc(rng, self.kinds)}

    def text(self, p):
        return f"How many {noun_phrase(p['ref'], plural=True)} are there?"

    def domain(self, p):
        return tuple(str(k) for k in range(5 if len(p["ref"]) == 1 else 4))

    def answer_type(self, p):
        return "number"

    def all_answers(self):
        return {str(k) for k in range(5)}

    def realise(self, s, geo, p, ans, rng):
        k = int(ans)
        cands = [i for i, a in enumerate(s) if _can_match(a, p["ref"])]
        if len(cands) < k:
            return None
        for _ in range(4):
            chosen = {int(i) for i in rng.permutation(cands)[:k]}
            t = _copy(s)
            ok = all(_force(t[i], p["ref"]) if i in chosen else _exclude(t[i], p["ref"], rng)
                     for i in range(len(t)))
            if ok:
                return t
        return None

    def truth(self, objs, geo, p):
        return str(sum(_matches(o, p["ref"]) for o in objs))


class Exists(Template):
    """'Is there a blue square?'"""

    family, weight = "exist", 0.06
    kinds = (("shape",), ("color",), ("color", "shape"), ("size", "shape"))

    def params(self, rng):
        return {"ref": _sample_desc(rng, self.kinds)}

    def text(self, p):
        return f"Is there {_article(noun_phrase(p['ref']))}?"

    def domain(self, p):
        return YES_NO

    def answer_type(self, p):
        return "yes/no"

    def realise(self, s, geo, p, ans, rng):
        if ans == "no":
            t = _copy(s)
            return t if all(_exclude(a, p["ref"], rng) for a in t) else None
        for i in rng.permutation(len(s)):
            t = _copy(s)
            if _force(t[int(i)], p["ref"]):
                return t
        return None

    def truth(self, objs, geo, p):
        return "yes" if any(_matches(o, p["ref"]) for o in objs) else "no"


REL_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def _two_refs(rng: np.random.Generator) -> tuple[Desc, Desc]:
    while True:
        a, b = _sample_desc(rng, REF_KINDS), _sample_desc(rng, REF_KINDS)
        if a != b:
            return a, b


def _realise_pair(s: State, geo: Sequence[Place], a: Desc, b: Desc, rel: str,
                  rng: np.random.Generator) -> State | None:
    """Pick objects i (described by a) clearly `rel` of j (described by b), both unique."""
    pairs = [(i, j) for i, j in permutations(range(len(s)), 2) if _clearly(geo, i, j, rel)]
    for k in rng.permutation(len(pairs)):
        i, j = pairs[int(k)]
        t = _copy(s)
        if _unique(t, a, i, rng) and _unique(t, b, j, rng):
            return t
    return None


class Relation(Template):
    """'Is the red circle to the left of the blue square?' -> yes/no."""

    family, weight = "position", 0.06

    def params(self, rng):
        a, b = _two_refs(rng)
        return {"a": a, "b": b, "rel": ("left", "right", "above", "below")[int(rng.integers(4))]}

    def text(self, p):
        return f"Is the {noun_phrase(p['a'])} {REL_PHRASE[p['rel']]} the {noun_phrase(p['b'])}?"

    def domain(self, p):
        return YES_NO

    def answer_type(self, p):
        return "yes/no"

    def realise(self, s, geo, p, ans, rng):
        rel = p["rel"] if ans == "yes" else OPPOSITE[p["rel"]]
        return _realise_pair(s, geo, p["a"], p["b"], rel, rng)

    def truth(self, objs, geo, p):
        i, j = _unique_index(objs, p["a"]), _unique_index(objs, p["b"])
        if i is None or j is None:
            return None
        if _clearly(geo, i, j, p["rel"]):
            return "yes"
        return "no" if _clearly(geo, i, j, OPPOSITE[p["rel"]]) else None


class Choice(Template):
    """'Is the red circle to the left or to the right of the star?' -> left/right (or above/below)."""

    family, weight = "position", 0.06

    def params(self, rng):
        a, b = _two_refs(rng)
        return {"a": a, "b": b, "axis": int(rng.integers(2))}

    def text(self, p):
        a, b = noun_phrase(p["a"]), noun_phrase(p["b"])
        if p["axis"] == 0:
            return f"Is the {a} to the left or to the right of the {b}?"
        return f"Is the {a} above or below the {b}?"

    def domain(self, p):
        return ("left", "right") if p["axis"] == 0 else ("above", "below")

    def all_answers(self):
        return set(OPPOSITE)

    def realise(self, s, geo, p, ans, rng):
        return _realise_pair(s, geo, p["a"], p["b"], ans, rng)

    def truth(self, objs, geo, p):
        i, j = _unique_index(objs, p["a"]), _unique_index(objs, p["b"])
        if i is None or j is None:
            return None
        return next((r for r in self.domain(p) if _clearly(geo, i, j, r)), None)


class Extreme(Template):
    """'What color is the leftmost object?', 'What shape is the topmost object?'"""

    family, weight = "position", 0.12

    def params(self, rng):
        which = tuple(EXTREME_REL)[int(rng.integers(4))]
        return {"which": which, "attr": ("color", "shape")[int(rng.integers(2))]}

    def text(self, p):
        return f"What {p['attr']} is the {p['which']} object?"

    def domain(self, p):
        return DOMAINS[p["attr"]]

    def all_answers(self):
        return set(SHAPES) | set(COLORS)

    def realise(self, s, geo, p, ans, rng):
        i = _extreme(geo, p["which"])
        if i is None:
            return None
        t = _copy(s)
        return t if _force(t[i], ((p["attr"], ans),)) else None

    def truth(self, objs, geo, p):
        i = _extreme(geo, p["which"])
        return None if i is None else objs[i][p["attr"]]


TEMPLATES: tuple[Template, ...] = (
    AttributeOf("color", "color", (("shape",), ("size", "shape")), ("What color is the {}?",), 0.20),
    AttributeOf("shape", "shape", (("color",), ("size", "color")),
                ("What shape is the {}?", "What is the shape of the {}?"), 0.18),
    AttributeOf("size", "size", REF_KINDS, ("Is the {} large or small?", "What size is the {}?"), 0.06),
    SizeYesNo(),
    Count(),
    Exists(),
    Relation(),
    Choice(),
    Extreme(),
)
FAMILIES = ("color", "shape", "count", "exist", "size", "position")


def answer_vocabulary() -> list[str]:
    """Every canonical answer the generator can give, sorted."""
    return sorted({a for t in TEMPLATES for a in t.all_answers()})


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


# ----------------------------------------------------------------------------------------------
# Human answers


def answer_variants(ans: str) -> list[str]:
    """Other ways a person types `ans` that the official normaliser maps back to it."""
    if ans.isdigit():
        word = NUM_WORDS[int(ans)] if int(ans) < len(NUM_WORDS) else ans
        return [word, word.capitalize(), f"{ans}."] + (["none"] if ans == "0" else [])
    if ans in YES_NO:
        return [ans.capitalize(), f"{ans}.", ans.upper()]
    if ans in SHAPES:
        return [ans.capitalize(), f"a {ans}", f"{ans}."]
    if ans in OPPOSITE:
        return [ans.capitalize(), f"{ans}.", f"the {ans}"] if ans in ("left", "right") else [ans.capitalize(),
                                                                                              f"{ans}."]
    return [ans.capitalize(), f"{ans}.", f"{ans}!"]


def human_answers(ans: str, domain: Sequence[str], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Ten answer records: mostly `ans` (sometimes spelt differently), ~5 % another answer of the domain.

    At most MAX_WRONG are wrong, so the majority (multiple_choice_answer) is always the true answer.
    """
    wrong_pool = [a for a in domain if a != ans]
    n_wrong = min(int(rng.binomial(10, WRONG_RATE)), MAX_WRONG) if wrong_pool else 0
    wrong_at = set(rng.choice(10, size=n_wrong, replace=False).tolist())
    variants = answer_variants(ans)
    texts, conf = [], []
    for k in range(10):
        if k in wrong_at:
            texts.append(wrong_pool[int(rng.integers(len(wrong_pool)))])
            conf.append(("maybe", "no", "yes")[int(rng.integers(3))])
            continue
        texts.append(variants[int(rng.integers(len(variants)))] if rng.random() < VARIANT_RATE else ans)
        u = rng.random()
        conf.append("yes" if u < 0.85 else "maybe" if u < 0.97 else "no")
    if len(set(texts)) == 1:
        # Unanimous humans are not normalised by the official scorer: keep them in canonical form.
        texts = [ans] * 10
    return [{"answer": t, "answer_confidence": c, "answer_id": k + 1}
            for k, (t, c) in enumerate(zip(texts, conf, strict=True))]


def majority_answer(records: Sequence[dict[str, Any]]) -> str:
    return Counter(normalize_answer(r["answer"]) for r in records).most_common(1)[0][0]


# ----------------------------------------------------------------------------------------------
# Blind prior


def blind_prior(train: Sequence[dict], val: Sequence[dict]) -> dict[str, Any]:
    """VQA accuracy on `val` of (a) the best answer per family and (b) per exact question string.

    Items: {"family", "question", "multiple_choice_answer", "answers": [raw strings]}. Best answers are
    the most frequent multiple_choice_answer on train (ties: alphabetical); (b) falls back to (a).
    """
    fam_counts: dict[str, Counter] = defaultdict(Counter)
    q_counts: dict[str, Counter] = defaultdict(Counter)
    for it in train:
        fam_counts[it["family"]][it["multiple_choice_answer"]] += 1
        q_counts[it["question"]][it["multiple_choice_answer"]] += 1

    def best(c: Counter) -> str:
        return min(c, key=lambda a: (-c[a], a))

    fam_best = {f: best(c) for f, c in fam_counts.items()}
    q_best = {q: best(c) for q, c in q_counts.items()}
    per: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for it in val:
        a = fam_best.get(it["family"], "yes")
        b = q_best.get(it["question"], a)
        per[it["family"]].append((vqa_accuracy(a, it["answers"]), vqa_accuracy(b, it["answers"])))

    def pct(xs: list[float]) -> float | None:
        return round(100.0 * sum(xs) / len(xs), 2) if xs else None

    out: dict[str, Any] = {"per_family": {}}
    for f in FAMILIES:
        xs = per.get(f, [])
        out["per_family"][f] = {
            "questions": len(xs),
            "family_best_answer": fam_best.get(f),
            "family_prior": pct([x[0] for x in xs]),
            "question_prior": pct([x[1] for x in xs]),
        }
    allx = [x for xs in per.values() for x in xs]
    out["overall"] = {"questions": len(allx), "family_prior": pct([x[0] for x in allx]),
                      "question_prior": pct([x[1] for x in allx])}
    return out


# ----------------------------------------------------------------------------------------------
# Writing the data set


def _info(split: str) -> dict[str, Any]:
    return {"description": "gridvqa synthetic shapes (VQA v2 format)", "version": "1.0", "year": 2024,
            "contributor": "gridvqa", "data_subtype": split}


LICENSE = {"name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}


def _write_image(path: Path, data: bytes, vg_path: Path | None) -> None:
    atomic_write_bytes(path, data)
    if vg_path is not None:
        _link_or_write(path, vg_path, data)


class _Writer:
    """Image writes on a few threads: each atomic write waits on fsync, which would otherwise dominate."""

    def __init__(self, workers: int = 8, max_pending: int = 256) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.pending: list[Future] = []
        self.max_pending = max_pending

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        if len(self.pending) >= self.max_pending:
            self.drain()

    def drain(self) -> None:
        pending, self.pending = self.pending, []
        for f in pending:
            f.result()  # re-raises the first write error here, in the caller's thread

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _link_or_write(src: Path, dst: Path, data: bytes) -> None:
    """VG image = the COCO file's pixels: hard link (no extra disk), or a copy where links fail."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link")
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        atomic_write_bytes(dst, data)


def _vg_entries(image_id: int, scene: Scene, boxes: Sequence[tuple[int, int, int, int]],
                first_object_id: int) -> tuple[dict, dict, dict]:
    """image_data, objects and attributes records of one image (VG image_id == COCO id)."""
    meta = {"image_id": image_id, "width": scene.width, "height": scene.height, "coco_id": image_id,
            "flickr_id": None, "url": f"{layout.VG_IMAGE_DIRS[0]}/{image_id}.jpg"}
    objs, attrs = [], []
    for k, (o, (x, y, bw, bh)) in enumerate(zip(scene.objs, boxes, strict=True)):
        box = {"object_id": first_object_id + k, "x": x, "y": y, "w": bw, "h": bh, "names": [o["shape"]],
               "synsets": []}
        objs.append(box)
        attrs.append({**box, "attributes": [o["color"], o["size"]]})
    return meta, {"image_id": image_id, "objects": objs}, {"image_id": image_id, "attributes": attrs}


def _check_args(counts: Sequence[int], seed: int, questions_per_image: int, min_side: int, max_side: int,
                max_objects: int) -> None:
    for name, v in zip(("train_images", "val_images", "test_images"), counts, strict=True):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if not 16 <= min_side <= max_side:
        raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 1 <= questions_per_image < 1000:  # question_id = image_id * 1000 + k
        raise ValueError(f"questions_per_image must be in 1..999, got {questions_per_image}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")


def generate(
    out_dir: str | os.PathLike,
    train_images: int = 2000,
    val_images: int = 500,
    test_images: int = 300,
    seed: int = 0,
    questions_per_image: int = 5,
    min_side: int = 160,
    max_side: int = 320,
    max_objects: int = 6,
    verbose: bool = False,
) -> dict[str, Any]:
    """Write the data set under `out_dir` in the official layout; return the stats (also in stats.json).

    Same arguments -> byte-identical files. Image ids run 1, 2, ... over train2014, val2014, test2015.
    """
    sizes = dict(zip(SPLITS, (train_images, val_images, test_images), strict=True))
    _check_args(list(sizes.values()), seed, questions_per_image, min_side, max_side, max_objects)
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: output path exists and is not a folder")
    t0 = time.perf_counter()
    vg = layout.vg_dir(root)
    vg_files: dict[str, list[dict]] = {"image_data.json": [], "objects.json": [], "attributes.json": []}
    blind_items: dict[str, list[dict]] = {s: [] for s in ANNOTATED}
    split_stats: dict[str, Any] = {}
    next_image_id, next_object_id = 1, 1
    writer = _Writer()
    try:
        for split_no, split in enumerate(SPLITS):
            counts: dict[str, Counter] = defaultdict(Counter)  # per split: each split is balanced alone
            questions, annotations = [], []
            fam_counts: Counter = Counter()
            n_objects = 0
            for i in range(sizes[split]):
                image_id = next_image_id
                next_image_id += 1
                rng = np.random.default_rng([seed, split_no, i])  # per image: independent of the others
                scene = make_scene(rng, counts, questions_per_image, min_side, max_side, max_objects)
                data, boxes = render(scene, rng)
                in_vg = split == "train2014"
                vg_path = vg / layout.VG_IMAGE_DIRS[0] / f"{image_id}.jpg" if in_vg else None
                writer.submit(_write_image, layout.coco_image_path(root, split, image_id), data, vg_path)
                n_objects += len(scene.objs)
                for k, q in enumerate(scene.questions):
                    qid = image_id * 1000 + k
                    questions.append({"image_id": image_id, "question": q.text, "question_id": qid})
                    fam_counts[q.template.family] += 1
                    answers = human_answers(q.answer, q.template.domain(q.params), rng)
                    mc = majority_answer(answers)
                    annotations.append({
                        "question_id": qid, "image_id": image_id, "question_type": question_type(q.text),
                        "answer_type": q.template.answer_type(q.params), "multiple_choice_answer": mc,
                        "answers": answers,
                    })
                    if split in blind_items:
                        blind_items[split].append({"family": q.template.family, "question": q.text,
                                                   "multiple_choice_answer": mc,
                                                   "answers": [a["answer"] for a in answers]})
                if in_vg:
                    for name, rec in zip(vg_files, _vg_entries(image_id, scene, boxes, next_object_id),
                                         strict=True):
                        vg_files[name].append(rec)
                    next_object_id += len(scene.objs)
            atomic_write_json(layout.questions_path(root, split), {
                "info": _info(split), "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split,
                "license": LICENSE, "questions": questions})
            if split in ANNOTATED:
                atomic_write_json(layout.annotations_path(root, split), {
                    "info": _info(split), "license": LICENSE, "data_subtype": split,
                    "annotations": annotations})
            split_stats[split] = {"images": sizes[split], "questions": len(questions), "objects": n_objects,
                                  "questions_per_family": {f: fam_counts[f] for f in FAMILIES},
                                  "annotated": split in ANNOTATED}
    finally:
        writer.close()
    for name, records in vg_files.items():
        atomic_write_json(vg / name, records)
    atomic_write_text(vg / "objects_vocab.txt", "\n".join(SHAPES) + "\n")
    atomic_write_text(vg / "attributes_vocab.txt", "\n".join(list(COLORS) + list(SIZES)) + "\n")
    prior = blind_prior(blind_items["train2014"], blind_items["val2014"]) if blind_items["val2014"] else {}
    stats = {
        "generator": "gridvqa.data.synthetic",
        "seed": seed,
        "params": {"questions_per_image": questions_per_image, "min_side": min_side, "max_side": max_side,
                   "max_objects": max_objects, "jpeg_quality": JPEG_QUALITY, "wrong_answer_rate": WRONG_RATE},
        "splits": split_stats,
        "visual_genome": {"images": len(vg_files["image_data.json"]), "objects": next_object_id - 1,
                          "source_split": "train2014"},
        "vocab": {"shapes": list(SHAPES), "colors": list(COLORS), "sizes": list(SIZES),
                  "families": list(FAMILIES), "answers": answer_vocabulary()},
        "blind_prior": {
            "scored_on": "val2014", "trained_on": "train2014", "unit": "percent VQA accuracy",
            "family_prior": "best single answer per question family",
            "question_prior": "best answer per exact question string (family fallback)",
            **prior,
        },
    }
    atomic_write_json(layout.stats_path(root), stats, indent=1)
    if verbose:
        print(summary(stats, root, time.perf_counter() - t0))
    return stats


def summary(stats: dict[str, Any], root: Path, seconds: float) -> str:
    lines = [f"synthetic shapes -> {root} (seed {stats['seed']}, {seconds:.1f} s)"]
    for split, s in stats["splits"].items():
        lines.append(f"  {split:10s} {s['images']:6d} images {s['questions']:7d} questions"
                     + ("  (with answers)" if s["annotated"] else ""))
    v = stats["visual_genome"]
    lines.append(f"  Visual Genome: {v['images']} images, {v['objects']} objects (train2014 images)")
    bp = stats["blind_prior"]
    if "overall" in bp:
        lines.append("  blind prior on val2014 (VQA accuracy %): family  best-per-family  best-per-question")
        for f, r in bp["per_family"].items():
            lines.append(f"    {f:9s} {r['questions']:6d} q  {_fmt(r['family_prior']):>8s}  "
                         f"{_fmt(r['question_prior']):>8s}")
        o = bp["overall"]
        lines.append(f"    {'overall':9s} {o['questions']:6d} q  {_fmt(o['family_prior']):>8s}  "
                     f"{_fmt(o['question_prior']):>8s}")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _non_negative(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gridvqa.data.synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", help="data root to write (official VQA v2 / COCO / VG layout)")
    ap.add_argument("--train-images", type=_non_negative, default=2000)
    ap.add_argument("--val-images", type=_non_negative, default=500)
    ap.add_argument("--test-images", type=_non_negative, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--questions-per-image", type=int, default=5)
    args = ap.parse_args(argv)
    try:
        generate(args.out_dir, args.train_images, args.val_images, args.test_images, seed=args.seed,
                 questions_per_image=args.questions_per_image, verbose=True)
    except (GridVQAError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
