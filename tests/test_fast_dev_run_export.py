"""A detector `fast_dev_run` (`debug=fdr`) never replaces exported backbone weights that are already there;
it exports only where nothing is (as PublishCheckpoint publishes), and a real run does replace them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from gridvqa.data.detection_data import VGDataModule
from gridvqa.lit.detection_module import EXPORT_FILES, DetectionModule


class Lines(logging.Handler):
    """The messages of one logger, whatever other tests did to propagation and the root handlers."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def fit_detector(root: Path, export_dir: Path, **trainer_kw) -> list[str]:
    """Train the smallest grid detector on `root`'s VG part; returns what the module logged."""
    dm = VGDataModule(str(root), train_short=64, test_short=64, max_size=96, num_workers=0, batch_size=2,
                      max_val_images=2)
    torch.manual_seed(0)
    module = DetectionModule(
        "grid", dict(name="R-tiny", norm="BN", freeze_at=0, res5_dilation=2),
        dict(anchor_sizes=[16, 32, 64], fc_dim=32, batch_size_per_image=16),
        num_classes=dm.num_classes, num_attributes=dm.num_attributes, export_dir=str(export_dir),
    )
    logger = logging.getLogger("gridvqa.lit.detection_module")
    lines, level, disabled = Lines(), logger.level, logger.disabled
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    logger.disabled = False
    try:
        pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, **trainer_kw).fit(module, datamodule=dm)
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
        logger.disabled = disabled
    return lines.lines


def test_fast_dev_run_keeps_an_existing_export(tiny_shapes, tmp_path):
    export = tmp_path / "artifacts" / "pretrain_vg"
    lines = fit_detector(tiny_shapes, export, fast_dev_run=1)  # nothing there: exported (tests, dry runs)
    assert all((export / name).is_file() for name in EXPORT_FILES)
    assert any(line.startswith("fast_dev_run: exported the debug weights") for line in lines)
    debug_weights = load_file(export / "backbone.safetensors")

    pretrained = {name: (export / name).read_bytes() for name in EXPORT_FILES}
    (export / "backbone.safetensors").write_bytes(b"a pre-trained backbone")
    pretrained["backbone.safetensors"] = b"a pre-trained backbone"
    lines = fit_detector(tiny_shapes, export, fast_dev_run=1)
    assert {name: (export / name).read_bytes() for name in EXPORT_FILES} == pretrained
    assert f"fast_dev_run: {export} left as it is (a debug run's weights replace no export)" in lines

    (export / "backbone.safetensors").unlink()  # any exported file counts: the rest stay as they are
    fit_detector(tiny_shapes, export, fast_dev_run=1)
    assert not (export / "backbone.safetensors").exists()
    assert (export / "detector.safetensors").read_bytes() == pretrained["detector.safetensors"]

    (export / "backbone.safetensors").write_bytes(b"a pre-trained backbone")
    fit_detector(tiny_shapes, export, max_steps=1, limit_val_batches=0)  # a real run does replace it
    trained = load_file(export / "backbone.safetensors")
    assert trained.keys() == debug_weights.keys()
