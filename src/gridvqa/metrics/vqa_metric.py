"""`VQAAccuracy`: the official per-question VQA accuracy as a torchmetrics Metric (syncs across processes).

Per-question scores come from `gridvqa.metrics.vqa_eval.vqa_accuracy` (predicted string vs. the human
answers, quirks included) or are passed in precomputed, e.g. the soft score of the predicted class:
with a vocabulary of normalised answers the 0/0.3/0.6/0.9/1 soft scores equal the official
leave-one-out rule, except for the all-humans-identical quirk, which only the string path reproduces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from gridvqa.metrics.vqa_eval import ANSWER_TYPES, vqa_accuracy

# compute() keys for the per-type results: "yes/no" would split a logged name like "val/acc_yes/no".
TYPE_KEYS: tuple[str, ...] = ("yes_no", "number", "other")
_TYPE_INDEX = {t: i for i, t in enumerate(ANSWER_TYPES)} | {k: i for i, k in enumerate(TYPE_KEYS)}


class VQAAccuracy(Metric):
    """Mean official VQA accuracy in [0, 1] (the CLI reports the same value x100).

    update(preds, human_answers, answer_types=None)   preds: answer strings, human_answers: their
                                                       lists of (usually ten) human answer strings
    update(scores=..., answer_types=None)              precomputed per-question scores in [0, 1]

    With `per_answer_type=True`, `answer_types` ("yes/no" | "number" | "other") is required and
    compute() returns {"overall", "yes_no", "number", "other"}; otherwise a scalar tensor.
    A type with no questions yet computes to nan.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, per_answer_type: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.per_answer_type = per_answer_type
        # float64 sums: a full val split (~200k questions) must add up exactly like the Python scorer.
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if per_answer_type:
            n = len(ANSWER_TYPES)
            self.add_state("type_sum", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("type_count", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str] | None = None, human_answers: Sequence[Sequence[str]] | None = None,
               answer_types: Sequence[str] | None = None, *, scores: Tensor | Sequence[float] | None = None,
               ) -> None:
        if (preds is None) == (scores is None):
            raise ValueError("VQAAccuracy.update: pass either preds (with human_answers) or scores, not both")
        if preds is not None:
            if isinstance(preds, str) or human_answers is None or len(human_answers) != len(preds):
                raise ValueError("VQAAccuracy.update: preds must be a list of strings with one list of human "
                                 "answers each")
            values = [vqa_accuracy(p, h) for p, h in zip(preds, human_answers, strict=True)]
            s = torch.tensor(values, dtype=torch.float64, device=self.score_sum.device)
        else:
            s = torch.as_tensor(scores).detach().flatten()
            s = s.to(device=self.score_sum.device, dtype=torch.float64)
        self.score_sum += s.sum()
        self.count += s.numel()
        if self.per_answer_type:
            if answer_types is None or len(answer_types) != s.numel():
                raise ValueError("VQAAccuracy(per_answer_type=True).update needs one answer type per "
                                 "question")
            try:
                idx = [_TYPE_INDEX[t] for t in answer_types]
            except KeyError as e:
                raise ValueError(f"VQAAccuracy: unknown answer type {e.args[0]!r}; expected one of "
                                 f"{', '.join(ANSWER_TYPES)}") from None
            idx_t = torch.tensor(idx, dtype=torch.long, device=s.device)
            self.type_sum.index_add_(0, idx_t, s)
            self.type_count.index_add_(0, idx_t, torch.ones_like(idx_t))

    def compute(self) -> Tensor | dict[str, Tensor]:
        overall = self.score_sum / self.count
        if not self.per_answer_type:
            return overall
        per_type = self.type_sum / self.type_count
        return {"overall": overall, **{k: per_type[i] for i, k in enumerate(TYPE_KEYS)}}
