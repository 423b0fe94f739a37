"""Objects of a scene: attribute vocabularies, descriptions and their phrases, the attribute solver
(allowed values only ever narrow) and the "clearly left of" geometry the position questions rely on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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

YES_NO = ("yes", "no")

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


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def sample_desc(rng: np.random.Generator, kinds: Sequence[tuple[str, ...]]) -> Desc:
    kind = kinds[int(rng.integers(len(kinds)))]
    return tuple((k, DOMAINS[k][int(rng.integers(len(DOMAINS[k])))]) for k in ATTR_ORDER if k in kind)


def matches(obj: Obj, desc: Desc) -> bool:
    return all(obj[k] == v for k, v in desc)


def unique_index(objs: Sequence[Obj], desc: Desc) -> int | None:
    hits = [i for i, o in enumerate(objs) if matches(o, desc)]
    return hits[0] if len(hits) == 1 else None


# ----------------------------------------------------------------------------------------------
# The attribute solver: constraints only ever narrow the allowed sets.


def can_match(a: dict[str, frozenset[str]], desc: Desc) -> bool:
    return all(v in a[k] for k, v in desc)


def force(a: dict[str, frozenset[str]], desc: Desc) -> bool:
    if not can_match(a, desc):
        return False
    for k, v in desc:
        a[k] = frozenset((v,))
    return True


def exclude(a: dict[str, frozenset[str]], desc: Desc, rng: np.random.Generator) -> bool:
    """Make the object unable to match `desc` by removing one of its values (a sufficient condition)."""
    if not can_match(a, desc):
        return True
    keys = [k for k, _ in desc if len(a[k]) > 1]
    if not keys:
        return False
    k = keys[int(rng.integers(len(keys)))]
    a[k] = a[k] - {dict(desc)[k]}
    return True


def unique(s: State, desc: Desc, i: int, rng: np.random.Generator) -> bool:
    return force(s[i], desc) and all(exclude(s[j], desc, rng) for j in range(len(s)) if j != i)


def copy_state(s: State) -> State:
    return [dict(a) for a in s]


# ----------------------------------------------------------------------------------------------
# Geometry: "clearly" means the horizontal (vertical) extents do not overlap, even at full size.

OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def clearly(geo: Sequence[Place], i: int, j: int, rel: str) -> bool:
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


def extreme(geo: Sequence[Place], which: str) -> int | None:
    rel = EXTREME_REL[which]
    if len(geo) < 2:
        return None
    for i in range(len(geo)):
        if all(clearly(geo, i, j, rel) for j in range(len(geo)) if j != i):
            return i
    return None
