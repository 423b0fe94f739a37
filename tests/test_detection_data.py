"""The VG detection data module: split files, dropped boxes reported, rank-exact resumable loaders."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import hydra
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from gridvqa.data.detection_data import EpochShardSampler, VGDataModule
from gridvqa.data.sampling import ResumableDataLoader, ShardSampler
from gridvqa.errors import ConfigError, DataError
from hydra_utils import compose_cfg

SMALL = dict(train_short=64, test_short=64, max_size=96, num_workers=0, batch_size=2)


def vg_ids(root: Path) -> list[int]:
    return [int(m["image_id"]) for m in json.loads((root / "vg" / "image_data.json").read_text())]


def split_ids(ds) -> list[int]:
    return sorted(ds.vg[i].image_id for i in ds.indices)


def test_split_files_train_on_train_and_val_score_test(tiny_shapes, tmp_path):
    ids = sorted(vg_ids(tiny_shapes))
    train, val, test = ids[:-8], ids[-8:-4], ids[-4:]
    (tmp_path / "train.txt").write_text("".join(f"VG_100K/{i}.jpg xml/{i}.xml\n" for i in train))
    (tmp_path / "val.txt").write_text("".join(f"{i}\n" for i in val))
    (tmp_path / "test.txt").write_text("".join(f"VG_100K_2/{i}.jpg xml/{i}.xml\n" for i in test))
    files = {"train": [str(tmp_path / "train.txt"), str(tmp_path / "val.txt")],
             "val": str(tmp_path / "test.txt")}
    dm = VGDataModule(str(tiny_shapes), exclude_vqa_val=False, split_files=files, **SMALL)
    dm.setup()
    assert split_ids(dm.train_set) == sorted(train + val)
    assert split_ids(dm.val_set) == test
    # at most max_val_images of the test list, chosen by the seed
    dm = VGDataModule(str(tiny_shapes), exclude_vqa_val=False, split_files=files, max_val_images=3, **SMALL)
    dm.setup()
    assert len(dm.val_set) == 3 and set(split_ids(dm.val_set)) <= set(test)
    # without split files: the seeded hold-out, as before
    dm = VGDataModule(str(tiny_shapes), exclude_vqa_val=False, val_fraction=0.25, **SMALL)
    dm.setup()
    assert len(dm.val_set) == round(len(ids) * 0.25)
    assert not set(split_ids(dm.val_set)) & set(split_ids(dm.train_set))


def test_bad_split_files_are_one_clear_error(tiny_shapes, tmp_path):
    ids = sorted(vg_ids(tiny_shapes))
    (tmp_path / "a.txt").write_text("".join(f"{i}\n" for i in ids[:6]))
    (tmp_path / "b.txt").write_text("".join(f"{i}\n" for i in ids[5:8]))
    dm = VGDataModule(str(tiny_shapes), split_files={"train": str(tmp_path / "a.txt"),
                                                     "val": str(tmp_path / "b.txt")}, **SMALL)
    with pytest.raises(DataError, match=r"b.txt: 1 validation image\(s\) are also in the training split"):
        dm.setup()
    dm = VGDataModule(str(tiny_shapes), split_files={"train": str(tmp_path / "a.txt"),
                                                     "val": str(tmp_path / "none.txt")}, **SMALL)
    with pytest.raises(DataError, match="none.txt: Visual Genome split file not found"):
        dm.setup()
    (tmp_path / "c.txt").write_text("999999\n")
    dm = VGDataModule(str(tiny_shapes), split_files={"train": str(tmp_path / "a.txt"),
                                                     "val": str(tmp_path / "c.txt")}, **SMALL)
    with pytest.raises(DataError, match="c.txt: no annotated Visual Genome image"):
        dm.setup()
    for bad in ({"train": "a.txt"}, {"train": "a.txt", "val": 3}, ["a.txt"], {"train": [], "val": "b"}):
        with pytest.raises(ConfigError, match="data.split_files"):
            VGDataModule(str(tiny_shapes), split_files=bad)


def write_damaged_vg(root: Path) -> None:
    """Two real images; among the boxes a NaN, a non-numeric, an unknown name and one outside the image."""
    vg = root / "vg"
    (vg / "VG_100K").mkdir(parents=True)
    (vg / "objects_vocab.txt").write_text("circle\nsquare\n")
    (vg / "attributes_vocab.txt").write_text("red\nblue\n")
    rng = np.random.default_rng(0)
    meta, anns = [], []
    for iid in (1, 2):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(vg / "VG_100K" / f"{iid}.jpg")
        meta.append({"image_id": iid, "width": 96, "height": 80, "coco_id": None,
                     "url": f"https://cs.stanford.edu/people/rak248/VG_100K/{iid}.jpg"})
        objs = [
            {"object_id": 10 * iid, "x": 10, "y": 10, "w": 30, "h": 30, "names": ["circle"],
             "attributes": ["red"]},
            {"object_id": 10 * iid + 1, "x": 50, "y": 20, "w": 30, "h": 40, "names": ["square"]},
            {"object_id": 10 * iid + 2, "x": math.nan, "y": 5, "w": 20, "h": 20, "names": ["circle"]},
            {"object_id": 10 * iid + 3, "x": 5, "y": "top", "w": 20, "h": 20, "names": ["square"]},
            {"object_id": 10 * iid + 4, "x": 5, "y": 5, "w": 20, "h": 20, "names": ["tree"]},
            {"object_id": 10 * iid + 5, "x": 200, "y": 5, "w": 20, "h": 20, "names": ["circle"]},
        ]
        anns.append({"image_id": iid, "attributes": objs})
    (vg / "image_data.json").write_text(json.dumps(meta))
    (vg / "attributes.json").write_text(json.dumps(anns))


def test_nan_boxes_never_reach_training_and_every_reason_is_logged(tmp_path, caplog):
    from gridvqa.lit.detection_module import DetectionModule

    write_damaged_vg(tmp_path)
    dm = VGDataModule(str(tmp_path), val_fraction=0.5, **SMALL)
    with caplog.at_level(logging.INFO, logger="gridvqa.data.detection_data"):
        dm.setup()
    lines = [r.getMessage() for r in caplog.records]
    assert "Visual Genome: 2 images, 4 boxes" in lines
    assert "Visual Genome: 4 boxes dropped: a coordinate missing or not a finite number" in lines
    assert "Visual Genome: 2 boxes dropped: object name not in the object vocabulary" in lines
    assert "Visual Genome: 2 boxes dropped: empty once clipped to the image" in lines
    for rec in dm.vg.records:
        assert np.isfinite(rec.boxes).all() and len(rec.boxes) == 2
    torch.manual_seed(0)
    module = DetectionModule(
        "grid", dict(name="R-tiny", norm="BN", freeze_at=0, res5_dilation=2),
        dict(anchor_sizes=[16, 32, 64], fc_dim=32, batch_size_per_image=16),
        num_classes=dm.num_classes, num_attributes=dm.num_attributes, export_dir=None,
    )
    trainer = pl.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_flips_change_with_the_epoch_and_are_reproducible(tiny_shapes):
    dm = VGDataModule(str(tiny_shapes), **SMALL)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, EpochShardSampler)
    ds = dm.train_set
    boxes = [ds[(epoch, 0)]["boxes"] for epoch in range(8)]
    assert any(not torch.equal(boxes[0], b) for b in boxes[1:])  # flipped in some epochs, not in others
    assert torch.equal(ds[(3, 0)]["boxes"], boxes[3])
    # the sampler hands the epoch to the dataset
    loader.sampler.set_epoch(5)
    keys = list(loader.sampler)
    assert {e for e, _ in keys} == {5} and sorted(i for _, i in keys) == list(range(len(ds)))


def test_loaders_shard_by_rank_and_resume_mid_epoch(tiny_shapes, tmp_path):
    cfg = compose_cfg(["trainer=ddp_cpu"], tiny_shapes, tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    dm = VGDataModule(str(tiny_shapes), **SMALL)
    dm.setup()
    dm.trainer = trainer
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert (train.sampler.num_replicas, train.sampler.rank) == (2, 0)
    assert len(train.sampler) == -(-len(dm.train_set) // 2)  # padded to equal shards
    assert isinstance(val.sampler, ShardSampler) and not val.sampler.shuffle
    assert list(val.sampler) == list(range(0, len(dm.val_set), 2))  # each validation image on one rank
    dm_small = VGDataModule(str(tiny_shapes), max_val_images=1, **SMALL)
    dm_small.setup()
    dm_small.trainer = trainer
    with pytest.raises(DataError, match="1 validation images for 2 processes"):
        dm_small.val_dataloader()

    # one process: a loader restored from the state after its first batch goes on with the second
    dm = VGDataModule(str(tiny_shapes), **SMALL)
    dm.setup()
    first = dm.train_dataloader()
    first.sampler.set_epoch(1)
    it = iter(first)
    next(it)
    state = first.state_dict()
    expected = next(it)["image_ids"]
    again = dm.train_dataloader()
    again.load_state_dict(state)
    assert next(iter(again))["image_ids"] == expected
