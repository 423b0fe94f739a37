"""Distributed training and evaluation: `trainer=ddp` / `trainer=ddp_cpu`, and the rank sharding of the
VQA loaders (every validation question scored once; training shards equal, so ranks step together)."""

from __future__ import annotations

import math

import hydra
import pytest
import torch
from omegaconf import open_dict
from pytorch_lightning.strategies import DDPStrategy

from gridvqa.data.sampling import ShardSampler
from gridvqa.data.vqa2 import load_split
from gridvqa.lit.checkpoint_io import AtomicCheckpointIO
from gridvqa.training import run
from hydra_utils import compose_cfg
from train_probe import one_torch_thread, read_records, run_train, tiny_overrides


class Items(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def shards(n: int, world: int, **kw) -> list[list[int]]:
    return [list(ShardSampler(Items(n), num_replicas=world, rank=r, **kw)) for r in range(world)]


@pytest.mark.parametrize("n,world", [(n, w) for n in (1, 5, 6, 7, 28) for w in (1, 2, 3, 4) if w <= n])
def test_eval_shards_hold_every_item_once(n, world):
    parts = shards(n, world)
    assert sorted(i for p in parts for i in p) == list(range(n))
    lengths = [len(ShardSampler(Items(n), num_replicas=world, rank=r)) for r in range(world)]
    assert [len(p) for p in parts] == lengths


@pytest.mark.parametrize("n,world", [(7, 2), (16, 2), (5, 4), (3, 8)])
def test_train_shards_are_equal_and_fixed_by_seed_and_epoch(n, world):
    parts = shards(n, world, shuffle=True, seed=5, pad=True)
    assert {len(p) for p in parts} == {math.ceil(n / world)}  # the same number of steps on every rank
    assert set(i for p in parts for i in p) == set(range(n))
    assert parts == shards(n, world, shuffle=True, seed=5, pad=True)
    s = ShardSampler(Items(n), num_replicas=world, rank=0, shuffle=True, seed=5, pad=True)
    orders = []
    for epoch in range(4):
        s.set_epoch(epoch)
        orders.append(list(s))
    assert len({tuple(o) for o in orders}) > 1 or n < 3  # a new order each epoch


def test_ddp_configs_compose(tiny_shapes, tmp_path):
    gpu = compose_cfg(["experiment=e2e", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
                      tiny_shapes)
    assert (gpu.trainer.strategy, gpu.trainer.accelerator, gpu.trainer.devices, gpu.trainer.num_nodes) == (
        "ddp", "gpu", 4, 2)
    assert gpu.trainer.sync_batchnorm is False
    cfg = compose_cfg(["experiment=e2e", "trainer=ddp_cpu"], tiny_shapes, tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy.num_processes == 2 and trainer.strategy.process_group_backend == "gloo"
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_too_few_eval_items_for_the_processes_is_one_clear_error(tiny_shapes, tmp_path):
    from gridvqa.data.vqa_data import VQADataModule
    from gridvqa.errors import DataError

    dm = VQADataModule(str(tiny_shapes), image_size=(64, 64), num_workers=0, limit_val=1)
    cfg = compose_cfg(["trainer=ddp_cpu"], tiny_shapes, tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    dm.trainer = trainer
    with pytest.raises(DataError, match="1 items for 2 processes"):
        dm.val_dataloader()


def test_two_processes_score_every_question_once_and_match_one_process(tiny_shapes, tmp_path):
    """One epoch of e2e on two CPU processes (DDP over gloo), validated at the end; then the checkpoint
    validated by one process: the same questions, each once, and the same accuracy and loss."""
    ddp_probe = tmp_path / "ddp_probe"
    run_train(
        [*tiny_overrides(tiny_shapes, tmp_path, ddp_probe), "trainer=ddp_cpu", "trainer.max_epochs=1"],
        tmp_path / "ddp_run", tmp_path / "ddp.log",
    )
    ranks = [read_records(ddp_probe, r) for r in range(2)]

    # training: disjoint shards of equal length covering the train split (16 images: no padding)
    train = [[q for rec in recs if rec["kind"] == "train" for q in rec["qids"]] for recs in ranks]
    steps = [sum(rec["kind"] == "train" for rec in recs) for recs in ranks]
    assert steps[0] == steps[1] == 4
    assert not set(train[0]) & set(train[1])
    assert sorted(train[0] + train[1]) == sorted(e.question_id for e in load_split(tiny_shapes, "train"))

    val_ids = sorted(e.question_id for e in load_split(tiny_shapes, "val"))
    ddp_val = [q for recs in ranks for rec in recs if rec["kind"] == "val" for q in rec["qids"]]
    assert sorted(ddp_val) == val_ids  # each validation question once over both ranks
    ddp_metrics = [rec["metrics"] for rec in ranks[0] if rec["kind"] == "val_metrics"][-1]

    one_probe = tmp_path / "one_probe"
    cfg = compose_cfg(
        [*tiny_overrides(tiny_shapes, tmp_path, one_probe), "train=false", "validate=true",
         f"ckpt_path={tmp_path / 'ddp_run' / 'checkpoints' / 'last.ckpt'}"],
        tiny_shapes, tmp_path / "one_run",
    )
    with open_dict(cfg):
        cfg.trainer.devices = 1
    with one_torch_thread():
        run(cfg)
    one = read_records(one_probe)
    assert sorted(q for rec in one if rec["kind"] == "val" for q in rec["qids"]) == val_ids
    one_metrics = [rec["metrics"] for rec in one if rec["kind"] == "val_metrics"][-1]
    assert set(one_metrics) == set(ddp_metrics)
    for k, v in ddp_metrics.items():
        assert one_metrics[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert 0 < one_metrics["val/vqa_acc"] < 100  # a trained model: the comparison means something

