"""Read checkpoint files without running code from them.

safetensors is read as is; torch files through `torch.load(weights_only=True)`; plain pickles (detectron2
model-zoo `.pkl`: a dict of numpy arrays under "model") through a restricted unpickler that admits only
what numpy array reconstruction needs. Anything else in a pickle is refused before it can run.
"""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gridvqa.errors import ConfigError, DataError

WHY_REFUSED = "only tensors and plain containers are read: unpickling other objects can run code"


class UnsafePickleError(DataError, pickle.UnpicklingError):
    """A pickle asks for a global (a callable) outside the allow-list; nothing from it ran. Still a
    pickle.UnpicklingError, as torch's own weights-only refusal is, for callers that catch that."""


def _numpy_core(name: str) -> Any:
    # numpy 2 renamed numpy.core to numpy._core; pickles name either, we resolve to the live object.
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return getattr(multiarray, name, None) or getattr(numeric, name)


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles made by Python 3 store bytes as _codecs.encode(text, "latin1"); other codecs
    # are not needed for arrays, so they are refused rather than trusted.
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(obj, encoding, errors)


_ALLOWED: dict[tuple[str, str], Any] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = lambda: _numpy_core("_reconstruct")
    _ALLOWED[(_mod, "scalar")] = lambda: _numpy_core("scalar")
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = lambda: _numpy_core("_frombuffer")
_ALLOWED[("numpy", "ndarray")] = lambda: np.ndarray
_ALLOWED[("numpy", "dtype")] = lambda: np.dtype
_ALLOWED[("collections", "OrderedDict")] = lambda: collections.OrderedDict
_ALLOWED[("_codecs", "encode")] = lambda: _latin1_encode


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose find_class admits numpy array reconstruction and OrderedDict, nothing else."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        # latin1 lets Python 2 pickles (older detectron/caffe2 conversions) carry numpy byte strings.
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise UnsafePickleError(f"{self.path}: refused to unpickle global {module}.{name} "
                                    "(only numpy arrays and OrderedDict are allowed)")
        return factory()


def _torch_safe_numpy_globals() -> list[Any]:
    # For torch zip files holding numpy arrays: let torch's weights_only unpickler build them.
    dtypes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "uint8", "bool")]
    return [_numpy_core("_reconstruct"), _numpy_core("scalar"), np.ndarray, np.dtype, *dtypes]


def refusal_reason(err: BaseException) -> str:
    """What torch's weights-only loader refused, in a few words (its own message spans many lines)."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds {found.group(1)}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return next((ln for ln in lines if "unsupported" in ln.lower()), lines[-1] if lines else "")


def _is_legacy_torch_file(p: Path) -> bool:
    """Whether `p` starts like torch.save's legacy (non-zip) format: its pickled magic number first."""
    starts = [pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=k) for k in range(2, 6)]
    try:
        with p.open("rb") as f:
            head = f.read(max(map(len, starts)))
    except OSError:
        return False
    return any(head.startswith(s) for s in starts)


def load_torch_file(
    path: str | os.PathLike,
    what: str = "torch checkpoint",
    safe_globals: list[Any] | None = None,
    mmap: bool = False,
    map_location: Any = "cpu",
) -> Any:
    """`torch.load(path, weights_only=True)` with one-line errors: ConfigError (no such file),
    UnsafePickleError (the file holds objects the weights-only loader refuses; nothing from it ran) or
    DataError (unreadable).

    `safe_globals`: classes admitted besides tensors and plain containers. `mmap`: map zip files instead
    of reading them (a cheap check of a large checkpoint). `map_location`: as torch.load's.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} not found")
    is_zip = zipfile.is_zipfile(p)
    kind = what if is_zip else f"{what} (legacy non-zip torch file)"
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(safe_globals or []):
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it was not written with
            return torch.load(p, map_location=map_location, weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as e:
        if not is_zip and not _is_legacy_torch_file(p):
            raise DataError(f"{p}: not a torch file (neither torch.save's zip nor legacy format)") from None
        raise UnsafePickleError(f"{p}: refused to load this {kind}: {refusal_reason(e)} ({WHY_REFUSED})"
                                ) from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, KeyError) as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise DataError(f"{p}: not a readable {kind} ({first})") from None


def check_resume_checkpoint(path: str | os.PathLike, key: str = "ckpt_path") -> None:
    """Fail before training starts, in one line, when `path` cannot be resumed from: missing, unreadable,
    or holding objects the weights-only loader refuses (zip files are mapped, not read)."""
    if not Path(path).is_file():
        raise ConfigError(f"{key}={path}: checkpoint to resume from not found")
    ckpt = load_torch_file(path, f"checkpoint to resume from ({key})", mmap=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise DataError(f"{key}={path}: not a Lightning checkpoint (no 'state_dict')")


def _load_pickled(p: Path) -> Any:
    if zipfile.is_zipfile(p) or _is_legacy_torch_file(p):
        return load_torch_file(p, "torch checkpoint", _torch_safe_numpy_globals())
    try:  # e.g. a plain pickle of numpy arrays (detectron2 model zoo)
        with p.open("rb") as f:
            return RestrictedUnpickler(f, p).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt pickles raise many types; all mean "unreadable"
        raise DataError(f"{p}: not a readable checkpoint pickle ({type(e).__name__}: {e})") from None


def _unwrap(obj: Any, p: Path) -> dict[str, Any]:
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return obj[key]
    if not isinstance(obj, dict):
        raise DataError(f"{p}: holds a {type(obj).__name__}, expected a state dict (a dict of tensors)")
    return obj


def _to_tensor(key: str, v: Any, p: Path) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, (np.ndarray, np.generic)):
        if v.dtype == object:
            raise DataError(f"{p}: entry {key!r} is an object array, not numbers")
        return torch.from_numpy(np.array(v))  # np.array copies: pickled buffers can be read-only
    if isinstance(v, (int, float, bool)):
        return torch.tensor(v)
    raise DataError(f"{p}: entry {key!r} is a {type(v).__name__}, not a tensor")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, .pth/.pt/.ckpt or .pkl without executing code from the file.

    `{"model": sd}` and `{"state_dict": sd}` wrappers are removed; numpy arrays become tensors.
    Raises DataError (missing / unreadable file) or UnsafePickleError (a pickle that asks for code).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: checkpoint not found")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise DataError(f"{p}: not a readable safetensors file ({e})") from None
    sd = _unwrap(_load_pickled(p), p)
    return {str(k): _to_tensor(str(k), v, p) for k, v in sd.items()}
