"""The VQA learning-rate schedules: `mcan` against a transcription of mcan-vqa's own rate, through a real
Lightning fit; `fraction` (the CPU configs') at representative points."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
from hydra.utils import instantiate

from feature_files import write_features
from gridvqa.errors import ConfigError
from gridvqa.lit.schedules import fraction_factor, mcan_epoch_factor
from gridvqa.lit.vqa_module import VQAModule
from hydra_utils import compose_cfg
from vqa_setup import bare_trainer, fit_on_one_thread

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def mcan_vqa_rates(lr_base: float, data_size: int, batch_size: int, max_epoch: int,
                   decay_list: tuple[int, ...], decay_r: float) -> list[float]:
    """The rate of every optimizer step of MILVLG/mcan-vqa: core/exec.py's epoch loop (adjust_lr at
    `epoch in LR_DECAY_LIST`, drop_last batches) around core/model/optim.py's WarmupOptimizer.rate."""
    rates, step = [], 0
    for epoch in range(max_epoch):
        if epoch in decay_list:
            lr_base *= decay_r
        for _ in range(data_size // batch_size):
            step += 1
            if step <= int(data_size / batch_size * 1):
                r = lr_base * 1 / 4.0
            elif step <= int(data_size / batch_size * 2):
                r = lr_base * 2 / 4.0
            elif step <= int(data_size / batch_size * 3):
                r = lr_base * 3 / 4.0
            else:
                r = lr_base
            rates.append(r)
    return rates


def test_mcan_schedule_is_mcan_vqas_rate_at_every_step():
    base, steps_per_epoch = 1e-4, 10
    ref = mcan_vqa_rates(base, 64 * steps_per_epoch, 64, 13, (10, 12), 0.2)
    ours = [base * mcan_epoch_factor(s // steps_per_epoch, 3, (10, 12), 0.2) for s in range(len(ref))]
    assert ours == pytest.approx(ref, rel=1e-12)
    # Representative steps (0-based): epochs 1, 2, 3 at 1/4, 2/4, 3/4; full from epoch 4; x0.2 from the
    # 11th epoch (after 10), x0.04 in the 13th.
    at = {0: 0.25, 9: 0.25, 10: 0.5, 25: 0.75, 30: 1.0, 99: 1.0, 100: 0.2, 119: 0.2, 120: 0.04, 129: 0.04}
    for step, factor in at.items():
        assert ref[step] == pytest.approx(base * factor) and ours[step] == pytest.approx(base * factor)
    assert len(ref) == 130


def test_fraction_schedule_keeps_its_shape():
    # 4 equal warm-up steps over the first `warmup` fraction, then x gamma at each milestone fraction.
    points = (0.0, 0.04, 0.06, 0.11, 0.16, 0.2, 0.49, 0.5, 0.8, 1.0)
    f = [fraction_factor(p, 0.2, (0.5, 0.8), 0.2) for p in points]
    assert f == pytest.approx([0.25, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.2, 0.04, 0.04])


def test_mcan_schedule_through_lightning(tiny_shapes, tmp_path):
    for split in ("train", "val"):
        if not (tiny_shapes / "features" / f"grid_{split}.h5").is_file():
            write_features(tiny_shapes, "grid", split)
    cfg = compose_cfg(["experiment=frozen_h5", "debug=tiny", "model.lr=1e-3", "model.schedule=mcan",
                       "model.warmup_epochs=3", "model.decay_epochs=[4]", "model.gamma=0.5"],
                      tiny_shapes, tmp_path / "run")
    model, dm = instantiate(cfg.model), instantiate(cfg.data)
    seen: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    steps = 2
    trainer = bare_trainer(max_epochs=5, limit_train_batches=steps, callbacks=[Record()])
    fit_on_one_thread(trainer, model, dm)
    # mcan-vqa run with an epoch of `steps` batches, decay after 4 epochs: 1/4, 2/4, 3/4, 1, 0.5
    assert seen == pytest.approx(mcan_vqa_rates(1e-3, steps * 2, 2, 5, (4,), 0.5), rel=1e-9)


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="model.schedule='cosine'"):
        VQAModule(source="grid_h5", visual_dim=8, answers=["yes"], tokenizer_json="{}", schedule="cosine")
