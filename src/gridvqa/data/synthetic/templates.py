"""Question templates: each draws its parameters, words the question, lists the answers it may have,
narrows a scene's allowed attributes so that the scene has a chosen answer, and reads the answer off a
finished scene."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import permutations

import numpy as np

from gridvqa.data.synthetic.objects import (
    COLORS,
    DOMAINS,
    EXTREME_REL,
    OPPOSITE,
    SHAPES,
    SIZES,
    YES_NO,
    Desc,
    Obj,
    Place,
    State,
    article,
    can_match,
    clearly,
    copy_state,
    exclude,
    extreme,
    force,
    matches,
    noun_phrase,
    sample_desc,
    unique,
    unique_index,
)

# Question types as VQA v2 names them (prefixes), longest match wins.
QUESTION_TYPES = (
    "what color is the", "what shape is the", "what size is the", "what is the", "how many",
    "is there a", "is there", "is the",
)


def question_type(question: str) -> str:
    words = question.lower().rstrip("?").split()
    for qt in sorted(QUESTION_TYPES, key=len, reverse=True):
        t = qt.split()
        if words[: len(t)] == t:
            return qt
    return " ".join(words[:3])


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


class YesNoTemplate(Template):
    """A question answered yes or no."""

    def domain(self, p):
        return YES_NO

    def answer_type(self, p):
        return "yes/no"


class DescribedTemplate(Template):
    """A question about every object one description picks out ('red objects', 'a large star')."""

    kinds = (("shape",), ("color",), ("color", "shape"), ("size", "shape"))

    def params(self, rng):
        return {"ref": sample_desc(rng, self.kinds)}


class AttributeOf(Template):
    """'What color is the circle?', 'What shape is the small red object?', 'What size is the star?'"""

    def __init__(self, family: str, attr: str, kinds: Sequence[tuple[str, ...]], wordings: Sequence[str],
                 weight: float) -> None:
        self.family, self.attr, self.kinds, self.wordings, self.weight = family, attr, kinds, wordings, weight

    def params(self, rng):
        return {"ref": sample_desc(rng, self.kinds), "w": int(rng.integers(len(self.wordings)))}

    def text(self, p):
        return self.wordings[p["w"]].format(noun_phrase(p["ref"]))

    def domain(self, p):
        return DOMAINS[self.attr]

    def all_answers(self):
        return set(DOMAINS[self.attr])

    def realise(self, s, geo, p, ans, rng):
        for i in rng.permutation(len(s)):
            t = copy_state(s)
            if force(t[i], ((self.attr, ans),)) and unique(t, p["ref"], int(i), rng):
                return t
        return None

    def truth(self, objs, geo, p):
        i = unique_index(objs, p["ref"])
        return None if i is None else objs[i][self.attr]


class SizeYesNo(YesNoTemplate):
    """'Is the red circle large?'"""

    family, weight = "size", 0.02

    def params(self, rng):
        return {"ref": sample_desc(rng, REF_KINDS), "size": SIZES[int(rng.integers(2))]}

    def text(self, p):
        return f"Is the {noun_phrase(p['ref'])} {p['size']}?"

    def realise(self, s, geo, p, ans, rng):
        size = p["size"] if ans == "yes" else next(z for z in SIZES if z != p["size"])
        for i in rng.permutation(len(s)):
            t = copy_state(s)
            if force(t[i], (("size", size),)) and unique(t, p["ref"], int(i), rng):
                return t
        return None

    def truth(self, objs, geo, p):
        i = unique_index(objs, p["ref"])
        return None if i is None else ("yes" if objs[i]["size"] == p["size"] else "no")


class Count(DescribedTemplate):
    """'How many red objects are there?' -> 0..4 (0..3 for two-attribute descriptions)."""

    family, weight = "count", 0.24

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
        cands = [i for i, a in enumerate(s) if can_match(a, p["ref"])]
        if len(cands) < k:
            return None
        for _ in range(4):
            chosen = {int(i) for i in rng.permutation(cands)[:k]}
            t = copy_state(s)
            ok = all(force(t[i], p["ref"]) if i in chosen else exclude(t[i], p["ref"], rng)
                     for i in range(len(t)))
            if ok:
                return t
        return None

    def truth(self, objs, geo, p):
        return str(sum(matches(o, p["ref"]) for o in objs))


class Exists(DescribedTemplate, YesNoTemplate):
    """'Is there a blue square?'"""

    family, weight = "exist", 0.06

    def text(self, p):
        return f"Is there {article(noun_phrase(p['ref']))}?"

    def realise(self, s, geo, p, ans, rng):
        if ans == "no":
            t = copy_state(s)
            return t if all(exclude(a, p["ref"], rng) for a in t) else None
        for i in rng.permutation(len(s)):
            t = copy_state(s)
            if force(t[int(i)], p["ref"]):
                return t
        return None

    def truth(self, objs, geo, p):
        return "yes" if any(matches(o, p["ref"]) for o in objs) else "no"


REL_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def _two_refs(rng: np.random.Generator) -> tuple[Desc, Desc]:
    while True:
        a, b = sample_desc(rng, REF_KINDS), sample_desc(rng, REF_KINDS)
        if a != b:
            return a, b


def _realise_pair(s: State, geo: Sequence[Place], a: Desc, b: Desc, rel: str,
                  rng: np.random.Generator) -> State | None:
    """Pick objects i (described by a) clearly `rel` of j (described by b), both unique."""
    pairs = [(i, j) for i, j in permutations(range(len(s)), 2) if clearly(geo, i, j, rel)]
    for k in rng.permutation(len(pairs)):
        i, j = pairs[int(k)]
        t = copy_state(s)
        if unique(t, a, i, rng) and unique(t, b, j, rng):
            return t
    return None


class Relation(YesNoTemplate):
    """'Is the red circle to the left of the blue square?' -> yes/no."""

    family, weight = "position", 0.06

    def params(self, rng):
        a, b = _two_refs(rng)
        return {"a": a, "b": b, "rel": ("left", "right", "above", "below")[int(rng.integers(4))]}

    def text(self, p):
        return f"Is the {noun_phrase(p['a'])} {REL_PHRASE[p['rel']]} the {noun_phrase(p['b'])}?"

    def realise(self, s, geo, p, ans, rng):
        rel = p["rel"] if ans == "yes" else OPPOSITE[p["rel"]]
        return _realise_pair(s, geo, p["a"], p["b"], rel, rng)

    def truth(self, objs, geo, p):
        i, j = unique_index(objs, p["a"]), unique_index(objs, p["b"])
        if i is None or j is None:
            return None
        if clearly(geo, i, j, p["rel"]):
            return "yes"
        return "no" if clearly(geo, i, j, OPPOSITE[p["rel"]]) else None


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
        i, j = unique_index(objs, p["a"]), unique_index(objs, p["b"])
        if i is None or j is None:
            return None
        return next((r for r in self.domain(p) if clearly(geo, i, j, r)), None)


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
        i = extreme(geo, p["which"])
        if i is None:
            return None
        t = copy_state(s)
        return t if force(t[i], ((p["attr"], ans),)) else None

    def truth(self, objs, geo, p):
        i = extreme(geo, p["which"])
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
