import os

import pytest

# No network at test time: hub libraries must never try to download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """A tiny built-in data set (official formats) with its answer vocabulary and tokenizer."""
    from gridvqa.data.prepare import prepare
    from gridvqa.data.synthetic import generate

    root = tmp_path_factory.mktemp("shapes")
    generate(root, train_images=16, val_images=6, test_images=4, seed=3)
    prepare(root, min_count=1)
    return root
