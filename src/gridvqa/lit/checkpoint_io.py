"""Checkpoint files written atomically, and read without running code from them.

`AtomicCheckpointIO` (wired in conf/trainer/default.yaml as a Trainer plugin) writes a checkpoint to a
hidden temporary file (`.partial-<pid>-<random>.tmp`) beside the target, fsyncs it and renames it over
the target: a kill or an error during a save leaves the previous checkpoint (e.g. last.ckpt, what
`ckpt_path=last` resumes from) whole, and nothing takes the temporary file for a checkpoint. The next
save into that folder removes what a killed one left.

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
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import get_filesystem

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


TEMP_PREFIX = ".partial-"


def temp_name(path: Path) -> Path:
    """Where `path` is written first: its folder (so the rename is atomic), hidden, not *.ckpt, and not
    containing the target's name (Lightning finds `hpc_ckpt_<n>` files by substring)."""
    return path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _fsync_dir(directory: Path) -> None:
    # the rename itself survives a power cut only once the directory entry is on disk
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _writer_alive(tmp: Path) -> bool:
    """Whether the process named in a temp file's name still runs here (it may be saving right now)."""
    try:
        pid = int(tmp.name[len(TEMP_PREFIX):].split("-")[0])
    except ValueError:
        return False
    if pid == os.getpid():
        return False  # ours, from a save that raised before it could clean up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` so that `path` is always either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for left in path.parent.glob(f"{TEMP_PREFIX}*.tmp"):
        if not _writer_alive(left):  # left by a process killed mid-save
            left.unlink(missing_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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
