"""What the DDP and resume tests need to watch real `python -m gridvqa.train` runs.

`Probe` is a test-only callback, added to a run with a Hydra override (`+callbacks.probe=...`; the tests
put this folder on PYTHONPATH for subprocesses). It appends one JSON line per event to
`<out>/rank<R>.jsonl` (flushed, so a record survives a SIGKILL of the run): the question ids of every
training and validation batch of its rank and the metrics of every validation pass. With
`pause_at_step=K` it writes `<out>/paused` and sleeps once a batch starts at global step >= K, i.e.
after the step-K checkpoint was written: the window in which a test kills the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch

from hydra_utils import compose_cfg

TESTS = Path(__file__).resolve().parent


class Probe(pl.Callback):
    def __init__(self, out: str, pause_at_step: int | None = None) -> None:
        self.out = Path(out)
        self.pause_at_step = pause_at_step

    def _write(self, trainer: pl.Trainer, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f"rank{trainer.global_rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.pause_at_step is not None and trainer.global_step >= self.pause_at_step:
            (self.out / "paused").write_text(str(trainer.global_step))
            time.sleep(600)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write(trainer, {"kind": "train", "epoch": trainer.current_epoch, "batch_idx": batch_idx,
                              "step": trainer.global_step, "qids": batch["question_id"].tolist()})

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._write(trainer, {"kind": "val", "qids": batch["question_id"].tolist()})

    def on_train_end(self, trainer, pl_module) -> None:
        # what training ended with: Lightning's last.ckpt is the last checkpoint *saved*, which with
        # save_last=True may be a few steps older than the end of the run
        final = {"state_dict": pl_module.state_dict(), "global_step": trainer.global_step,
                 "optimizer": trainer.optimizers[0].state_dict(),
                 "lr_scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict()}
        torch.save(final, self.out / f"final_rank{trainer.global_rank}.pt")

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self._write(trainer, {"kind": "val_metrics", "epoch": trainer.current_epoch, "metrics": metrics})


def read_records(out: Path, rank: int = 0) -> list[dict]:
    path = out / f"rank{rank}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tiny_overrides(
    data_root: Path, tmp: Path, probe_out: Path, pause_at_step: int | None = None
) -> list[str]:
    """`experiment=e2e` (random backbone) at the tests' CPU size, everything written under `tmp`."""
    overrides = [
        "experiment=e2e",
        "backbone.weights=null",
        "logger=csv",
        f"paths.data_root={data_root}",
        f"paths.log_dir={tmp / 'logs'}",
        f"paths.artifacts_dir={tmp / 'artifacts'}",
        "data.image_size=[96,96]",
        "data.num_workers=0",
        "data.batch_size=2",
        "data.val_batch_size=4",
        "model.head.size=tiny",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "+callbacks.probe._target_=train_probe.Probe",
        f"+callbacks.probe.out={probe_out}",
    ]
    if pause_at_step is not None:
        overrides.append(f"+callbacks.probe.pause_at_step={pause_at_step}")
    if "val_attention" in compose_cfg(["experiment=e2e"], data_root).callbacks:
        overrides.append("callbacks.val_attention=null")  # pictures cost time and show nothing here
    return overrides


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """In-process runs on one thread, like the subprocesses: the same arithmetic (so bit-equal
    results), and no oversubscribed 2-thread kernels crawling on a busy machine (50x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def start_train(overrides: list[str], run_dir: Path, log: Path) -> subprocess.Popen:
    """`python -m gridvqa.train` in a subprocess (its own session, so a test can kill the whole group),
    one torch thread per process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    with open(log, "wb") as f:
        cmd = [sys.executable, "-m", "gridvqa.train", *overrides, f"hydra.run.dir={run_dir}"]
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def run_train(overrides: list[str], run_dir: Path, log: Path, timeout: float = 300) -> None:
    proc = start_train(overrides, run_dir, log)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert rc == 0, f"training run failed (rc {rc}):\n{log.read_text(errors='replace')[-4000:]}"
