"""Exact resume (a run killed and resumed with `ckpt_path=last` ends like an uninterrupted one) and
atomic checkpoint writes."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import hydra
import pytest
import torch

from gridvqa.data.sampling import ResumableDataLoader, ShardSampler
from gridvqa.lit.checkpoint_io import AtomicCheckpointIO
from gridvqa.training import run
from hydra_utils import compose_cfg
from train_probe import one_torch_thread, read_records, start_train, tiny_overrides


class Items(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 11

    def __getitem__(self, i: int) -> int:
        return i


def loader(num_workers: int = 0) -> ResumableDataLoader:
    sampler = ShardSampler(Items(), shuffle=True, seed=3, pad=True)
    return ResumableDataLoader(Items(), sampler=sampler, batch_size=2, num_workers=num_workers)


def lightning_resume(state: dict, epoch: int, num_workers: int = 0) -> list[list[int]]:
    """What Lightning does on resume: a fresh loader, load_state_dict, iter(), then set_epoch."""
    dl = loader(num_workers)
    dl.load_state_dict(state)
    it = iter(dl)
    dl.sampler.set_epoch(epoch)
    return [b.tolist() for b in it]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_resumes_mid_epoch_and_at_epoch_end(num_workers):
    dl = loader(num_workers)
    dl.sampler.set_epoch(1)
    full = [b.tolist() for b in dl]
    assert len(full) == len(dl) == 6
    dl.sampler.set_epoch(1)
    it = iter(dl)
    head = [next(it).tolist() for _ in range(4)]  # workers have fetched ahead: only handed-out batches count
    state = dl.state_dict()
    assert (state["epoch"], state["batches"]) == (1, 4)
    del it
    assert head + lightning_resume(state, 1, num_workers) == full

    end_state = {**state, "batches": len(dl)}  # saved after the epoch's last batch
    nxt = loader()
    nxt.sampler.set_epoch(2)
    assert lightning_resume(end_state, 2) == [b.tolist() for b in nxt]


def test_training_order_is_fixed_by_seed_and_epoch_only():
    a, b = loader(), loader()
    for dl in (a, b):
        dl.sampler.set_epoch(3)
    torch.manual_seed(0)
    first = [x.tolist() for x in a]
    torch.manual_seed(1)  # the global RNG plays no part
    assert first == [x.tolist() for x in b]
    b.sampler.set_epoch(4)
    assert first != [x.tolist() for x in b]


RESUME = ["trainer.max_epochs=2", "trainer.deterministic=true",
          "callbacks.step_checkpoint.every_n_train_steps=3"]
KILL_AT = 9  # global step: epoch 1 (8 steps an epoch), batch 1 done, step checkpoint 9 written


def assert_same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_killed_run_resumed_from_last_ends_like_an_uninterrupted_run(tiny_shapes, tmp_path):
    # uninterrupted: 2 epochs x 8 steps, deterministic
    full_probe = tmp_path / "full_probe"
    cfg = compose_cfg([*tiny_overrides(tiny_shapes, tmp_path, full_probe), *RESUME], tiny_shapes,
                      tmp_path / "full")
    with one_torch_thread():
        run(cfg)

    # the same run in a subprocess, SIGKILLed mid-epoch 1 once the step-9 checkpoint is on disk
    killed_probe, killed_dir = tmp_path / "killed_probe", tmp_path / "killed"
    proc = start_train([*tiny_overrides(tiny_shapes, tmp_path, killed_probe, pause_at_step=KILL_AT), *RESUME],
                       killed_dir, tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 300
        while not (killed_probe / "paused").is_file():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    last = killed_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert (ckpt["global_step"], ckpt["epoch"]) == (KILL_AT, 1)  # mid-epoch: the data order must be restored
    steps = [r["step"] for r in read_records(killed_probe) if r["kind"] == "train"]
    assert steps == list(range(1, KILL_AT + 1))

    # resumed in the same run folder with ckpt_path=last
    cfg = compose_cfg([*tiny_overrides(tiny_shapes, tmp_path, killed_probe), *RESUME, "ckpt_path=last"],
                      tiny_shapes, killed_dir)
    with one_torch_thread():
        run(cfg)

    full, resumed = read_records(full_probe), read_records(killed_probe)
    train = [[(r["epoch"], r["batch_idx"], r["step"], r["qids"]) for r in recs if r["kind"] == "train"]
             for recs in (full, resumed)]
    assert train[0] == train[1]  # the same batches in the same order, killed part + resumed part
    metrics = [[r["metrics"] for r in recs if r["kind"] == "val_metrics"][-1] for recs in (full, resumed)]
    assert metrics[0] == metrics[1] and metrics[0]["val/vqa_acc"] > 0
    final = [torch.load(p / "final_rank0.pt", weights_only=True) for p in (full_probe, killed_probe)]
    assert final[0]["global_step"] == 16
    assert_same(final[0], final[1], "final")  # weights, Adam moments, schedule: bit for bit


# -- atomic checkpoints ----------------------------------------------------------------------------------


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full, say")


class Arbitrary:  # a class a weights-only loader must refuse to build
    pass


def test_failed_save_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert io.load_checkpoint(path)["global_step"] == 1


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch
    from gridvqa.lit.checkpoint_io import AtomicCheckpointIO

    class KillHere:
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGKILL)

    io, path = AtomicCheckpointIO(), sys.argv[1]
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    io.save_checkpoint({"global_step": 2, "w": torch.zeros(10**6), "x": KillHere()}, path)
""")


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    cmd = [sys.executable, "-c", KILL_DURING_SAVE, str(path)]
    proc = subprocess.run(cmd, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode(errors="replace")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and left[0].startswith(".partial-") and left[1] == "last.ckpt"  # + half-written
    io = AtomicCheckpointIO()
    assert io.load_checkpoint(path)["global_step"] == 1
    io.save_checkpoint({"global_step": 3}, path)  # the next save clears what the killed one left
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_loading_is_weights_only_unless_asked_otherwise(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"obj": Arbitrary()}, path)
    with pytest.raises(pickle.UnpicklingError):
        AtomicCheckpointIO().load_checkpoint(path)
    assert isinstance(AtomicCheckpointIO().load_checkpoint(path, weights_only=False)["obj"], Arbitrary)


def test_trainers_write_checkpoints_atomically(tiny_shapes, tmp_path):
    for trainer in ("cpu", "gpu", "ddp", "ddp_cpu"):
        cfg = compose_cfg([f"trainer={trainer}"], tiny_shapes, tmp_path)
        plugins = [hydra.utils.get_class(p._target_) for p in cfg.trainer.plugins]
        assert AtomicCheckpointIO in plugins, trainer
    cfg = compose_cfg(["trainer=cpu"], tiny_shapes, tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
