"""model.compile_head: the MCAN head compiled in place gives the eager head's answers, keeps the
checkpoint keys, and trains (slow: inductor compiles C++ on a CPU)."""

from __future__ import annotations

import pytest
import torch

from gridvqa.data import layout
from gridvqa.data.vqa2 import AnswerVocab
from gridvqa.lit.vqa_module import VQAModule

pytestmark = pytest.mark.slow


def _module(root, compile_head: bool) -> VQAModule:
    torch.manual_seed(0)
    tokenizer_json = (layout.tokenizer_dir(root) / "tokenizer.json").read_text(encoding="utf-8")
    answers = AnswerVocab.load(layout.answers_path(root)).answers
    return VQAModule(source="region_h5", visual_dim=16, head={"size": "tiny"}, answers=answers,
                     tokenizer_json=tokenizer_json, compile_head=compile_head)


def test_compiled_head_answers_as_the_eager_one_and_trains(tiny_shapes):
    eager, compiled = _module(tiny_shapes, False).eval(), _module(tiny_shapes, True).eval()
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. in the keys
    g = torch.Generator().manual_seed(1)
    batch = {
        "q_ids": torch.randint(1, 20, (3, 14), generator=g),
        "q_mask": torch.ones(3, 14, dtype=torch.bool),
        "regions": torch.randn(3, 5, 16, generator=g),
        "boxes": torch.rand(3, 5, 4, generator=g) * 50,
        "region_mask": torch.ones(3, 5, dtype=torch.bool),
        "orig_size": torch.tensor([[60, 80]] * 3),
        "img_index": torch.arange(3),
    }
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch), eager(batch), rtol=1e-4, atol=1e-4)
    compiled.train()
    loss = compiled(batch).sum()
    loss.backward()
    assert all(p.grad is not None for p in compiled.head.classifier.parameters())
