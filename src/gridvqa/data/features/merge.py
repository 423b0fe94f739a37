"""merge_feature_files: shard files of one extraction (one per process) -> one finished feature file.

The merge goes through the writer's commit protocol under `out`'s writer lock: images are committed as
part files, then consolidated. A killed merge therefore leaves `out` resumable, and running the same merge
again continues where it stopped and gives the same file as one uninterrupted run. A finished shard whose
images are all taken, in its own row order, becomes one part by hard link (no copy; a feature file is never
modified in place, so the link is a snapshot), so the data is copied once, by the consolidation. A virtual
dataset over the shards was not used: the documented reader finds parts only in `<out>.parts/`, and a
finished file must not depend on files beside it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from gridvqa.data.features.format import Index, parts_dir, provenance_diff
from gridvqa.data.features.index import check_fields
from gridvqa.data.features.lock import WriterLock
from gridvqa.data.features.reader import GridFeatures, RegionFeatures, open_features
from gridvqa.data.features.store import PartStore
from gridvqa.errors import DataError

Reader = GridFeatures | RegionFeatures
Entry = tuple[int, int]  # (shard, image position in that shard)


def merge_feature_files(
    parts: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    commit_bytes: int = 256 << 20,
) -> Path:
    """Merge feature files of one kind, dtype and provenance into one finished file at `out`.

    Images come in the order of `parts`, each part's in its own order. An id in several parts with the
    same content (image size, extent, every row bit for bit) is kept once; with other content, or parts
    that disagree in provenance (kind, dtype included) or row datasets, DataError names the file. An
    existing `out` must be this merge, finished or interrupted (it is finished, or left as it is), unless
    `overwrite=True`. The parts are locked against writers while they are read and never modified.
    `commit_bytes`: rows copied between two commits (what a kill can make the next run copy again).
    """
    out = Path(out)
    # a part named twice is read once (its images would all be repeats)
    sources = list({os.path.realpath(p): Path(p) for p in parts}.values())
    if not sources:
        raise ValueError("merge_feature_files needs at least one part")
    for p in sources:
        if p.exists() and out.exists() and os.path.samefile(p, out):
            raise DataError(f"{out}: the merge output is also one of its parts")
    with ExitStack() as stack:
        for p in sources:  # no writer may change a shard while it is read
            stack.callback(WriterLock(p, parts_dir(p), 0.0).release)
        readers = [stack.enter_context(open_features(p)) for p in sources]
        _check_agree(readers)
        plan = _plan(readers)
        lock = WriterLock(out, parts_dir(out), 0.0)
        stack.callback(lock.release)
        first = readers[0]._index
        store = PartStore(out, first.kind, first.provenance, overwrite, commit_bytes=commit_bytes)
        _check_resumable(store, readers, plan)
        _copy(store, readers, plan[len(store.index.image_ids) :])
        store.commit()
        store.consolidate()
    return out


def _check_agree(readers: list[Reader]) -> None:
    """Every part has the first one's provenance and (once it holds an image) its row datasets."""
    first = readers[0]
    fields = next((r._index.fields for r in readers if r._index.fields is not None), None)
    for r in readers[1:]:
        diffs = provenance_diff(first.provenance, r.provenance, (f"in {first.path}", "here"))
        if diffs:
            raise DataError(f"{r.path}: cannot merge, provenance differs ({'; '.join(diffs)})")
    for r in readers:
        why = check_fields(r._index.fields, fields)
        if why is not None:
            raise DataError(f"{r.path}: cannot merge, its row datasets differ from the other parts ({why})")


def _same_image(a: Reader, i: int, b: Reader, j: int) -> str | None:
    """How image i of `a` and image j of `b` (same id) differ; None when they are the same."""
    ia, ib = a._index, b._index
    if ia.image_size[i] != ib.image_size[j]:
        return f"image_size {ia.image_size[i]} vs {ib.image_size[j]}"
    if ia.extent[i] != ib.extent[j]:
        return f"{'grid_shape' if ia.kind == 'grid' else 'num_boxes'} {ia.extent[i]} vs {ib.extent[j]}"
    image_id = ia.image_ids[i]
    names = list(ia.fields or {})
    rows_a, rows_b = a._fetch(image_id, names)[1], b._fetch(image_id, names)[1]
    for name in names:
        if rows_a[name].tobytes() != rows_b[name].tobytes():
            return f"{name} differs"
    return None


def _plan(readers: list[Reader]) -> list[Entry]:
    """The merged images in order, each id once; refuses an id whose copies differ."""
    first_seen: dict[int, Entry] = {}
    plan: list[Entry] = []
    for k, r in enumerate(readers):
        for i, image_id in enumerate(r._index.image_ids):
            seen = first_seen.get(image_id)
            if seen is None:
                first_seen[image_id] = (k, i)
                plan.append((k, i))
                continue
            why = _same_image(readers[seen[0]], seen[1], r, i)
            if why is not None:
                other = readers[seen[0]].path
                raise DataError(f"{r.path}: image {image_id} is also in {other} with other content ({why})")
    return plan


def _check_resumable(store: PartStore, readers: list[Reader], plan: list[Entry]) -> None:
    """An existing `out` holds the first images of the plan, as the plan has them."""
    index = store.index
    done = len(index.image_ids)
    have = list(zip(index.image_ids, index.image_size, index.extent, strict=True))
    want = [_describe(readers[k]._index, i) for k, i in plan[:done]]
    if done > len(plan) or have != want:
        raise DataError(
            f"{store.path}: exists and is not a merge of these parts; pass overwrite=True to start afresh"
        )


def _describe(index: Index, i: int) -> tuple[int, tuple[int, int], tuple[int, ...]]:
    return index.image_ids[i], index.image_size[i], index.extent[i]


def _whole_file(index: Index, run: list[int]) -> bool:
    """`run` is every image of a finished file, in row order, covering its rows exactly."""
    if index.parts or run != list(range(len(index.image_ids))):
        return False
    counts = [int(np.prod(e)) for e in index.extent]
    starts = np.cumsum([0, *counts]).tolist()
    return index.offset == starts[:-1] and starts[-1] == index.total_rows


def _copy(store: PartStore, readers: list[Reader], todo: list[Entry]) -> None:
    """Add the images of `todo` to `store`, run by run of images from one part."""
    start = 0
    while start < len(todo):
        k = todo[start][0]
        stop = start
        while stop < len(todo) and todo[stop][0] == k:
            stop += 1
        reader, run = readers[k], [i for _, i in todo[start:stop]]
        index = reader._index
        if _whole_file(index, run):
            store.adopt(reader.path, [_describe(index, i) for i in run], index.fields, index.total_rows)
        else:
            names = list(index.fields or {})
            for i in run:
                image_id, size, extent = _describe(index, i)
                store.append((image_id, size, extent, reader._fetch(image_id, names)[1]))
                if store.commit_due() == 0.0:
                    store.commit()
        start = stop
