"""`logger=csv|tensorboard|wandb|many`: real short trainings (one train and one val batch, a full epoch's
hooks: fast_dev_run would swap the loggers for a dummy) and what each logger wrote."""

from __future__ import annotations

import csv
import socket
import threading
from pathlib import Path

import pytest
from omegaconf import open_dict

from gridvqa.training import run
from hydra_utils import compose_cfg

LOGGERS = {"csv": {"csv"}, "tensorboard": {"tensorboard"}, "wandb": {"wandb"},
           "many": {"csv", "tensorboard", "wandb"}}


def run_short(root: Path, out: Path, overrides: list[str], epochs: int = 1,
              experiment: str = "frozen_random") -> float | None:
    """`experiment` at `debug=tiny` for `epochs` epochs of one train and one val batch each, without
    fast_dev_run (which would swap the loggers for a dummy)."""
    tiny = ["debug=tiny", "trainer.fast_dev_run=false", f"trainer.max_epochs={epochs}",
            f"trainer.min_epochs={epochs}"]
    cfg = compose_cfg([f"experiment={experiment}", *tiny, *overrides], root, out)
    with open_dict(cfg):
        cfg.paths.artifacts_dir = str(out / "artifacts")
        cfg.paths.log_dir = str(out / "logs")
    return run(cfg)


def tensorboard_tags(folder: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(folder.glob("events.out.tfevents.*")), f"no TensorBoard event file in {folder}"
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc.Tags()


class _Listener:
    """A local TCP port that counts connections: wandb pointed here shows whether it tried the network."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    """No key anywhere (env, netrc) and no WANDB_MODE; wandb's API address is a local port we watch."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    listener = _Listener()
    monkeypatch.setenv("WANDB_BASE_URL", listener.url)
    yield listener
    listener.close()


@pytest.mark.parametrize("name", LOGGERS)
def test_logger_group_selects_its_loggers(name, tmp_path):
    cfg = compose_cfg([f"logger={name}"], tmp_path)
    assert set(cfg.logger) == LOGGERS[name]


@pytest.mark.parametrize("name", ["csv", "tensorboard"])
def test_single_logger_writes_metrics(name, tiny_shapes, tmp_path):
    out = tmp_path / "run"
    run_short(tiny_shapes, out, [f"logger={name}", "callbacks.val_attention=null"])
    if name == "csv":
        rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
        assert any(r.get("train/loss") for r in rows) and any(r.get("val/vqa_acc") for r in rows)
        assert not (out / "tensorboard").exists()
    else:
        scalars = tensorboard_tags(out / "tensorboard")["scalars"]
        assert {"train/loss", "val/vqa_acc", "val/vqa_acc_yes_no"} <= set(scalars)
        assert not (out / "csv").exists()


def test_many_loggers_and_wandb_offline_without_a_key(no_wandb_key, tiny_shapes, tmp_path):
    """logger=many: csv, TensorBoard and wandb (offline: no key is configured) in one run, with the
    validation attention pictures going to each; wandb never connects to its server."""
    import wandb

    out = tmp_path / "run"
    try:
        run_short(tiny_shapes, out, ["logger=many", "callbacks.val_attention.num=2"])
        assert wandb.run is None, "run() left its wandb run open: a sweep's next job would log into it"
    finally:
        wandb.finish()
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/vqa_acc") for r in rows)
    tags = tensorboard_tags(out / "tensorboard")
    assert {"train/loss", "val/vqa_acc"} <= set(tags["scalars"])
    assert len([t for t in tags["images"] if t.startswith("val/attention/question_")]) == 2
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline wandb run under {out / 'wandb'}, found {runs}"
    assert list(runs[0].glob("run-*.wandb")), "the offline run has no data file"
    assert len(list(runs[0].glob("files/media/images/val/attention_*.png"))) == 2
    assert len(list((out / "attention" / "epoch_000").glob("question_*.png"))) == 2  # csv takes no images
    assert no_wandb_key.connections == 0, "wandb tried to reach its server without a key"
