"""The committing core of a writer: buffered images -> immutable part files -> an index replaced atomically.

Used by one thread at a time (the caller's, or the background writer's), always under the file's
WriterLock. Temporary names: a part is written through gridvqa.atomic inside <file>.parts (only the lock
holder writes there, so any *.tmp in it is a leftover); the index keeps a temp name of its own,
``.<file>.<pid>-<random>.tmp``, so that the lock holder removes exactly the leftovers of that file, whatever
their pid (atomic.clean_stale judges a temp by its pid, which cannot tell a dead writer of this file
from a live thread of this process or a process on another host sharing the folder).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from gridvqa.atomic import atomic_path, replace_atomically
from gridvqa.data.features.format import (
    Fields,
    Index,
    default_fields,
    parts_dir,
    provenance_diff,
    write_attrs,
    write_part_index,
    write_per_image,
)
from gridvqa.data.features.index import Unreadable, first_line, load_index, part_of_each_image, without_parts
from gridvqa.errors import DataError

log = logging.getLogger("gridvqa.data.features")

COPY_BLOCK_BYTES = 64 << 20
Image = tuple[int, tuple[int, int], tuple[int, ...], dict[str, np.ndarray]]  # id, (h, w), extent, rows


class PartStore:
    """The file at `path` as an index over part files, with the images not yet committed."""

    def __init__(
        self,
        path: Path,
        kind: str,
        provenance: dict,
        overwrite: bool,
        *,
        commit_bytes: int,
        commit_images: int | None = None,
        commit_seconds: float | None = None,
    ) -> None:
        self.path, self.kind, self.provenance = path, kind, provenance
        self.parts = parts_dir(path)
        self.commit_bytes = int(commit_bytes)
        self.commit_images = commit_images
        self.commit_seconds = commit_seconds
        self.buffer: list[Image] = []
        self.buffer_bytes = 0
        self.oldest = 0.0  # time.monotonic() of the first buffered image
        # A consolidated existing file's data becomes part 0 (by hard link) at the first commit.
        self.base_rows = 0
        self.dropped_parts = False
        old = self._existing_index(overwrite)
        # overwrite: the old file stays until the first commit (flush / close) replaces it
        self.stale = old is None and path.exists()
        if old is not None:
            self.index = old
            self.base_rows = 0 if old.parts else old.total_rows
        else:
            self.index = Index(kind=kind, provenance=provenance, feature_dim=0)
        self.remove_leftovers(keep=self.referenced_on_disk)
        if not path.exists() or self.dropped_parts:
            # a new file exists (empty, with its provenance) from the start; readers of a file with a
            # damaged part can read the rest again at once
            self.commit_index()

    # -- opening ---------------------------------------------------------------------------------
    def _existing_index(self, overwrite: bool) -> Index | None:
        self.referenced_on_disk: set[str] = set()
        if not self.path.exists():
            return None
        try:
            old = load_index(self.path, keep_damaged=True)
        except Unreadable as e:
            if overwrite:
                return None
            raise DataError(f"{e}; pass overwrite=True to start afresh") from None
        except DataError:
            if overwrite:
                return None
            raise
        self.referenced_on_disk = {name for name, _ in old.parts}
        if overwrite:
            return None
        diffs = provenance_diff(old.provenance, self.provenance, ("in file", "now"))
        if diffs:
            raise DataError(
                f"{self.path}: written with different provenance ({'; '.join(diffs)}); "
                "pass overwrite=True to start afresh"
            )
        if old.damaged:
            if all(why == "missing" for why in old.damaged.values()) and len(old.damaged) == len(old.parts):
                raise DataError(
                    f"{self.path}: its part files are missing from {self.parts} (move the folder with "
                    "the file, or pass overwrite=True to start afresh)"
                )
            old = self._drop_damaged(old)
        return old

    def _drop_damaged(self, old: Index) -> Index:
        per_part = dict.fromkeys(old.damaged, 0)
        for k in part_of_each_image(old):
            name = old.parts[k][0]
            if name in per_part:
                per_part[name] += 1
        for name, why in old.damaged.items():
            log.warning(
                "%s: part file %s is %s; its %d image(s) are dropped and will be extracted again",
                self.path,
                self.parts / name,
                why if why == "missing" else f"damaged ({why})",
                per_part[name],
            )
        self.dropped_parts = True
        return without_parts(old, set(old.damaged))

    def remove_leftovers(self, keep: set[str]) -> None:
        """Temp files of killed runs and parts no committed index refers to (we hold the lock)."""
        for p in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            p.unlink(missing_ok=True)
        for p in self.parts.iterdir():
            if p.name.endswith(".tmp") or (p.name.startswith("part-") and p.name not in keep):
                p.unlink(missing_ok=True)

    # -- buffering -------------------------------------------------------------------------------
    def append(self, image: Image) -> None:
        """Buffer one checked image; the first image of a file fixes C and the optional fields."""
        rows = image[3]
        if self.index.fields is None:
            self.index.fields = {name: (a.dtype, a.shape[1:]) for name, a in rows.items()}
            self.index.feature_dim = int(rows["features"].shape[1])
        if not self.buffer:
            self.oldest = time.monotonic()
        self.buffer.append(image)
        self.buffer_bytes += sum(a.nbytes for a in rows.values())

    def commit_due(self) -> float | None:
        """Seconds until the buffered images must be committed (0: now; None: no deadline)."""
        if not self.buffer:
            return None
        full = self.buffer_bytes >= self.commit_bytes
        if full or (self.commit_images is not None and len(self.buffer) >= self.commit_images):
            return 0.0
        if self.commit_seconds is None:
            return None
        return max(0.0, self.oldest + self.commit_seconds - time.monotonic())

    # -- committing ------------------------------------------------------------------------------
    def _next_part(self) -> str:
        used = [int(p.name[5:11]) for p in self.parts.glob("part-??????*.h5") if p.name[5:11].isdigit()]
        used += [int(name[5:11]) for name, _ in self.index.parts]
        # the random tail: numbering restarts after a consolidation, names must not
        return f"part-{max(used, default=-1) + 1:06d}-{secrets.token_hex(4)}.h5"

    def _write_part(self) -> str:
        """The buffered images' rows as one new part file (written image by image: no concatenated copy).

        h5py lays out the datasets; the rows go in with os.pwrite, which (unlike an h5py write) releases
        the GIL: a background writer then leaves the caller's thread free while the bytes are written.
        """
        name = self._next_part()
        total = sum(len(b[3]["features"]) for b in self.buffer)
        with atomic_path(self.parts / name) as tmp:
            with h5py.File(tmp, "w") as f:
                layout = {key: _contiguous(f, key, total, first) for key, first in self.buffer[0][3].items()}
            fd = os.open(tmp, os.O_WRONLY)
            try:
                for key, (offset, dtype) in layout.items():
                    for *_, rows in self.buffer:
                        offset += _pwrite_all(fd, np.ascontiguousarray(rows[key], dtype=dtype), offset)
            finally:
                os.close(fd)
        return name

    def _adopt_base(self) -> None:
        """Make a consolidated file's data part 0, by hard link (no copy) where the filesystem allows."""
        name = self._next_part()
        try:
            os.link(self.path, self.parts / name)
        except OSError:
            shutil.copyfile(self.path, self.parts / name)
        self.index.parts = [(name, self.base_rows)]
        self.base_rows = 0

    def adopt(
        self,
        source: Path,
        images: list[tuple[int, tuple[int, int], tuple[int, ...]]],
        fields: Fields | None,
        rows: int,
    ) -> None:
        """Commit the rows of the finished feature file `source` as one part, with its `images` (id, size,
        extent) in row order: by hard link where the file system allows, else by copy."""
        self.commit()  # what is buffered comes first
        if self.base_rows:
            self._adopt_base()
        name = self._next_part()
        try:
            os.link(source, self.parts / name)
        except OSError:
            with atomic_path(self.parts / name) as tmp:
                shutil.copyfile(source, tmp)
        idx = self.index
        if idx.fields is None:
            idx.fields = fields
            idx.feature_dim = int(fields["features"][1][0]) if fields else 0
        offset = idx.total_rows
        for image_id, size, extent in images:
            idx.image_ids.append(image_id)
            idx.image_size.append(size)
            idx.offset.append(offset)
            idx.extent.append(extent)
            offset += int(np.prod(extent))
        idx.parts.append((name, rows))
        idx.total_rows += rows
        self.commit_index()

    def commit(self) -> None:
        """Commit the buffered images now: after this returns they survive a kill."""
        if not self.buffer:
            if self.stale:
                self.commit_index()
            return
        if self.base_rows:
            self._adopt_base()
        idx = self.index
        name = self._write_part()
        offset = idx.total_rows
        for image_id, size, extent, r in self.buffer:
            idx.image_ids.append(image_id)
            idx.image_size.append(size)
            idx.offset.append(offset)
            idx.extent.append(extent)
            offset += len(r["features"])
        idx.parts.append((name, offset - idx.total_rows))
        idx.total_rows = offset
        self.buffer, self.buffer_bytes = [], 0
        self.commit_index()

    @contextmanager
    def _index_temp(self) -> Iterator[Path]:
        """A temp path beside the file, renamed over it on success, removed on an error."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            yield tmp
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        replace_atomically(tmp, self.path)

    def commit_index(self) -> None:
        with self._index_temp() as tmp, h5py.File(tmp, "w") as f:
            write_attrs(f, self.index)
            write_per_image(f, self.index)
            write_part_index(f, self.index, self.parts.name)
        self.stale = False
        keep = {name for name, _ in self.index.parts}
        self.remove_leftovers(keep)  # parts of an overwritten file become garbage only now
        self.referenced_on_disk = keep

    def consolidate(self) -> None:
        """Copy the parts into one plain file that replaces the index, then delete them."""
        if not self.index.parts:
            return
        idx = self.index
        fields = idx.fields or default_fields(idx.kind, idx.dtype, idx.feature_dim)
        with self._index_temp() as tmp, h5py.File(tmp, "w") as f:
            write_attrs(f, idx)
            write_per_image(f, idx)
            for key, (dt, trailing) in fields.items():
                self._copy_field(f.create_dataset(key, shape=(idx.total_rows, *trailing), dtype=dt), key)
        self.index.parts = []
        self.remove_leftovers(keep=set())

    def _copy_field(self, out: h5py.Dataset, key: str) -> None:
        row_bytes = out.dtype.itemsize * int(np.prod(out.shape[1:], dtype=np.int64))
        block = max(1, COPY_BLOCK_BYTES // max(1, row_bytes))
        start = 0
        for name, n in self.index.parts:
            try:
                with h5py.File(self.parts / name, "r") as src:
                    for i in range(0, n, block):
                        j = min(n, i + block)
                        out[start + i : start + j] = src[key][i:j]
            except (OSError, KeyError) as e:  # damaged since the writer opened the file
                raise DataError(
                    f"{self.path}: part file {self.parts / name} is damaged ({first_line(e)}); the file is "
                    "left unconsolidated: open a writer again to redo its images"
                ) from None
            start += n


def _contiguous(f: h5py.File, key: str, rows: int, like: np.ndarray) -> tuple[int, np.dtype]:
    """Create dataset `key` of `rows` rows like `like`'s, its space allocated now and not filled:
    (byte offset of its data in the file, its dtype)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # every byte is written next
    ds = f.create_dataset(key, shape=(rows, *like.shape[1:]), dtype=like.dtype, dcpl=dcpl)
    return ds.id.get_offset(), ds.dtype


def _pwrite_all(fd: int, a: np.ndarray, offset: int) -> int:
    """Write the bytes of the C-contiguous array `a` at `offset`; returns how many."""
    view = memoryview(a).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return len(view)
