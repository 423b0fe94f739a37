"""Checkpoint files written atomically, and read without running code from them.

`AtomicCheckpointIO` (wired in conf/trainer/default.yaml as a Trainer plugin) writes a checkpoint through
gridvqa.atomic: a hidden temporary file (`.partial-<pid>-<random>.tmp`) beside the target, fsynced and
renamed over the target. A kill or an error during a save leaves the previous checkpoint (e.g.
last.ckpt, what `ckpt_path=last` resumes from) whole, and nothing takes the temporary file for a
checkpoint. The next save into that folder removes what a killed one left.

Loading defaults to `torch.load(weights_only=True)` whatever torch's own default is: Lightning's
resume (`trainer.fit(ckpt_path=...)`) goes through here, and our checkpoints hold only tensors and
plain containers. A caller that passes `weights_only=False` explicitly still gets that. A file it
refuses, or a missing one, is a one-line GridVQAError naming the file.

Lightning logs "`weights_only` was not set, defaulting to `False`" whenever a checkpoint is *written*
without saying whether to leave out the optimizer state (it means "full training state", not unsafe
loading): `quiet_weights_only_notice` drops that line, since loading here is always weights-only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import get_filesystem

from gridvqa.atomic import atomic_path, clean_stale

log = logging.getLogger(__name__)

_NOTICE = "`weights_only` was not set"


class _DropWeightsOnlyNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _NOTICE not in record.getMessage()


def quiet_weights_only_notice() -> None:
    """Drop Lightning's "`weights_only` was not set, defaulting to `False`" log line (idempotent)."""
    logger = logging.getLogger("pytorch_lightning.trainer.connectors.checkpoint_connector")
    if not any(isinstance(f, _DropWeightsOnlyNotice) for f in logger.filters):
        logger.addFilter(_DropWeightsOnlyNotice())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` so that `path` is always either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)  # what a save killed midway left
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with atomic local saves (temp file + fsync + rename) and weights-only loads.

    Remote paths (s3://, gs://, ...) keep Lightning's own save, whose object-store upload is all or
    nothing already.
    """

    def __init__(self) -> None:
        super().__init__()
        quiet_weights_only_notice()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        safe = True if weights_only is None else weights_only
        if safe and isinstance(get_filesystem(path), LocalFileSystem):
            from gridvqa.models.safe_load import load_torch_file

            return load_torch_file(path, "checkpoint", map_location=map_location)
        return super().load_checkpoint(path, map_location, weights_only=safe)
