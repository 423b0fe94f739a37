"""Checks of an entry point's config before any work starts: each bad value is a ConfigError naming the
key, the value and what is allowed, and every output location must be writable up front (an hour of
training or extraction must not end in a failed write).

Light on purpose (omegaconf and the standard library): the entry points run these before importing
torch or Lightning. Keys absent from a config are not checked, so one check serves the VQA and the
detector training configs alike.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from gridvqa.errors import ConfigError

_ABSENT = object()
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


# ---------------------------------------------------------------------------------------------------
# Aliases


def apply_data_root(cfg: DictConfig) -> None:
    """`data_root=DIR` (top level, as the README writes it) is `paths.data_root=DIR`: everything that
    reads the data (data.data_root, the vocabulary paths, extraction's output) follows it."""
    root = cfg.get("data_root")
    if root is not None and "paths" in cfg:
        cfg.paths.data_root = str(root)


# ---------------------------------------------------------------------------------------------------
# Values


def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return "null" if value is None else str(value)


def _bad(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={_show(value)}: expected {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(cfg: DictConfig, key: str, minimum: int = 1, nullable: bool = False) -> None:
    """`key` is an integer >= minimum (or null when `nullable`)."""
    value = _get(cfg, key)
    if value is _ABSENT or (value is None and nullable):
        return
    if not _is_int(value) or value < minimum:
        raise _bad(key, value, f"an integer >= {minimum}" + (" or null" if nullable else ""))


def check_positive_number(cfg: DictConfig, key: str, zero_ok: bool = False) -> None:
    value = _get(cfg, key)
    if value is _ABSENT:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if not ok or value < 0 or (value == 0 and not zero_ok):
        raise _bad(key, value, "a number >= 0" if zero_ok else "a number > 0")


def check_choice(cfg: DictConfig, key: str, choices: Sequence[str]) -> None:
    value = _get(cfg, key)
    if value is not _ABSENT and value not in choices:
        raise _bad(key, value, "one of " + " | ".join(choices))


def check_device(cfg: DictConfig, key: str = "device") -> None:
    value = _get(cfg, key)
    if value is not _ABSENT and value is not None and not DEVICE_RE.match(str(value)):
        raise _bad(key, value, "auto | cpu | cuda | cuda:N | mps")


def check_size(cfg: DictConfig, key: str) -> None:
    """A fixed resize `[height, width]` of two integers >= 1, or null (then the short-side rule)."""
    value = _get(cfg, key)
    if value is _ABSENT or value is None:
        return
    if not isinstance(value, list) or len(value) != 2 or not all(_is_int(v) and v >= 1 for v in value):
        raise _bad(key, value, "[height,width], two integers >= 1, or null (then the short side rule)")


def check_short_side(cfg: DictConfig, prefix: str = "", many: bool = False) -> None:
    """With `image_size: null`, `short` (one integer, or a list of them when `many`) must be set."""
    size, short = _get(cfg, prefix + "image_size"), _get(cfg, prefix + "short")
    if size is None and short is None:
        raise ConfigError(f"{prefix}image_size=null needs {prefix}short=S (and {prefix}max_size=M): the "
                          "resize rule")
    check_sides(cfg, prefix + "short", many=many)
    check_int(cfg, prefix + "max_size", nullable=True)


def check_sides(cfg: DictConfig, key: str, many: bool = True) -> None:
    """An image side in pixels: an integer >= 1, or (`many`) a list of them (multi-scale training)."""
    value = _get(cfg, key)
    if value is _ABSENT or value is None:
        return
    values = value if many and isinstance(value, list) and value else [value]
    if not all(_is_int(v) and v >= 1 for v in values):
        allowed = "an integer >= 1" + (" or a list of them" if many else "")
        raise _bad(key, value, allowed)


def check_split(cfg: DictConfig, key: str = "split") -> None:
    from gridvqa.data import layout

    value = _get(cfg, key)
    if value is _ABSENT:
        return
    try:
        layout.official_split(str(value))
    except ValueError:
        names = sorted(layout.SPLIT_ALIASES)
        raise _bad(key, value, "a VQA split: " + " | ".join(names)) from None


# ---------------------------------------------------------------------------------------------------
# Output locations


def check_writable(path: str | os.PathLike, key: str, folder: bool = False) -> Path:
    """Fail now, naming `key`, if `path` (a file, or a `folder` to write into) cannot be written: the
    nearest existing folder above it must let us create it, an existing file must be writable."""
    p = Path(path)
    where = f"{key}={p}"
    if p.exists():
        if folder and not p.is_dir():
            raise ConfigError(f"{where}: is a file, expected a folder to write into")
        if not folder and p.is_dir():
            raise ConfigError(f"{where}: is a folder, expected a file path")
        if not os.access(p, os.W_OK):
            raise ConfigError(f"{where}: not writable (permissions or a read-only file system)")
        if folder:
            return p
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{where}: cannot be written: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: cannot be written: {ancestor} is not writable (permissions or a "
                          "read-only file system)")
    return p


def _check_output(cfg: DictConfig, key: str, folder: bool = False) -> None:
    value = _get(cfg, key)
    if value is not _ABSENT and value is not None:
        check_writable(str(value), key, folder=folder)


# ---------------------------------------------------------------------------------------------------
# Per entry point


def check_train(cfg: DictConfig) -> None:
    """`python -m gridvqa.train`: data and optimiser values, outputs, and the checkpoint to resume from."""
    data = _get(cfg, "data._target_")
    check_int(cfg, "seed", minimum=0, nullable=True)
    check_int(cfg, "data.batch_size")
    check_int(cfg, "data.val_batch_size", nullable=True)
    check_int(cfg, "data.num_workers", minimum=0)
    check_int(cfg, "data.limit_train", nullable=True)
    check_int(cfg, "data.limit_val", nullable=True)
    if isinstance(data, str) and data.endswith("VQADataModule"):
        check_size(cfg, "data.image_size")
        check_short_side(cfg, "data.")
    check_sides(cfg, "data.train_short")
    check_sides(cfg, "data.test_short", many=False)
    check_int(cfg, "data.max_size", nullable=True)
    check_positive_number(cfg, "model.lr")
    for key in ("model.backbone_lr_mult", "model.weight_decay", "model.backbone_weight_decay"):
        check_positive_number(cfg, key, zero_ok=True)
    _check_output(cfg, "callbacks.publish_checkpoint.path")
    _check_output(cfg, "model.export_dir", folder=True)
    ckpt = _get(cfg, "ckpt_path")
    if ckpt not in (_ABSENT, None, "last"):
        from gridvqa.models.safe_load import check_resume_checkpoint

        check_resume_checkpoint(str(ckpt), "ckpt_path")
    init = _get(cfg, "model.init_from")
    if init not in (_ABSENT, None) and not Path(str(init)).is_file():
        raise ConfigError(f"model.init_from={init}: VQA checkpoint to start from not found (train one with: "
                          "python -m gridvqa.train experiment=frozen)")


def check_extract(cfg: DictConfig) -> None:
    """`python -m gridvqa.extract`: resize, loader and storage values, and the output file."""
    from gridvqa.data.features import DTYPES, KINDS

    check_choice(cfg, "kind", KINDS)
    if _get(cfg, "images_dir") in (None, _ABSENT):
        check_split(cfg, "split")
    check_size(cfg, "image_size")
    check_short_side(cfg)
    for key in ("batch_size", "commit_images"):
        check_int(cfg, key)
    check_int(cfg, "num_workers", minimum=0)
    check_int(cfg, "max_images", nullable=True)
    check_choice(cfg, "dtype", DTYPES)
    check_choice(cfg, "preprocess", ("auto", "workers", "device"))
    check_choice(cfg, "merge", ("auto", "only", "off"))
    check_int(cfg, "shards", nullable=True)
    check_int(cfg, "shard", minimum=0, nullable=True)
    check_int(cfg, "merge_wait", minimum=0)
    check_device(cfg)
    _check_output(cfg, "output")
    _check_output(cfg, "id_map")


def check_evaluate(cfg: DictConfig) -> None:
    """`python -m gridvqa.evaluate`: split, loader values and where the results file goes."""
    check_split(cfg, "split")
    check_int(cfg, "batch_size")
    check_int(cfg, "num_workers", minimum=0)
    check_device(cfg)
    _check_output(cfg, "out")


def check_predict(cfg: DictConfig) -> None:
    check_int(cfg, "topk")
    check_device(cfg)


def check_visualize(cfg: DictConfig) -> None:
    check_int(cfg, "num")
    check_int(cfg, "topk")
    check_int(cfg, "layer", minimum=-(2**31))
    check_int(cfg, "seed", minimum=0, nullable=True)
    check_choice(cfg, "attention", ("flat", "guided"))
    if _get(cfg, "image") in (None, _ABSENT):
        check_split(cfg, "split")
    check_device(cfg)
    _check_output(cfg, "out", folder=True)


CHECKS: dict[str, Callable[[DictConfig], None]] = {
    "train": check_train, "extract": check_extract, "evaluate": check_evaluate, "predict": check_predict,
    "visualize": check_visualize,
}
