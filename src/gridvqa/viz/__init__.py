"""Attention pictures over images: heat maps for grid models, shaded boxes for region models."""

from gridvqa.viz.attention import (
    Explanation,
    ModelView,
    draw_answers,
    draw_attention,
    explain,
    explain_entry,
    load_views,
    notebook_paths,
    object_names,
    pick_questions,
    plot_explanations,
    plot_layers,
    png_bytes,
    save_png,
    write_pair_picture,
    write_split_pictures,
)
from gridvqa.viz.geometry import GridGeometry

__all__ = [
    "Explanation",
    "GridGeometry",
    "ModelView",
    "draw_answers",
    "draw_attention",
    "explain",
    "explain_entry",
    "load_views",
    "notebook_paths",
    "object_names",
    "pick_questions",
    "plot_explanations",
    "plot_layers",
    "png_bytes",
    "save_png",
    "write_pair_picture",
    "write_split_pictures",
]
