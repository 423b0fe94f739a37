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

Modules: objects (attributes, descriptions, solver, geometry), templates (question templates), scenes (scene
making and rendering), answers (human answers, blind prior), writers (the official files; generate), cli.
"""

from gridvqa.data.synthetic.answers import MAX_WRONG, answer_variants, blind_prior, human_answers
from gridvqa.data.synthetic.cli import main
from gridvqa.data.synthetic.objects import COLORS, SHAPES, SIZES
from gridvqa.data.synthetic.scenes import Scene, make_scene, render
from gridvqa.data.synthetic.templates import FAMILIES, TEMPLATES, answer_vocabulary, question_type
from gridvqa.data.synthetic.writers import ANNOTATED, SPLITS, generate

__all__ = [
    "ANNOTATED",
    "COLORS",
    "FAMILIES",
    "MAX_WRONG",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TEMPLATES",
    "Scene",
    "answer_variants",
    "answer_vocabulary",
    "blind_prior",
    "generate",
    "human_answers",
    "main",
    "make_scene",
    "question_type",
    "render",
]
