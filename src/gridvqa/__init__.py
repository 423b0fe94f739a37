"""gridvqa: end-to-end, pixels-to-answer VQA training with grid features."""

__version__ = "0.1.0"
