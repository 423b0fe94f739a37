"""Extraction in several processes: one shard of the images per process, each into its own part file,
then one merge into the documented single-file format.

    python -m gridvqa.extract kind=grid split=train shards=4 shard=2     # one of 4 processes
    torchrun --nproc_per_node=4 -m gridvqa.extract kind=grid split=train  # shards/shard from WORLD_SIZE/RANK
    python -m gridvqa.extract kind=grid split=train shards=4 merge=only   # the merge alone

Shard i of N takes every N-th image of the source (sorted by id, or by path for a folder) starting at i
and writes `<output stem>.shard-<i>-of-<N><suffix>` beside `output`; each part resumes like any output.
No process waits on a collective barrier: with merge=auto, the process of shard 0, once its own part is
done, watches the other part files (a part is complete when it holds all its images or lists them as
skipped, and no writer has it open: its `.parts` folder is gone) and merges them with
gridvqa.data.features.merge_feature_files when all are. Images already in a merged `output` are not
extracted again, and a later merge adds the new parts to it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridvqa.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MERGE_MODES = ("auto", "only", "off")
_POLL_S = 2.0


@dataclass(frozen=True)
class ShardPlan:
    shards: int  # processes in all (1: no sharding)
    shard: int  # this process's shard, 0 .. shards-1
    merge: str  # auto | only | off
    output: Path  # the merged file

    @property
    def active(self) -> bool:
        return self.shards > 1

    def part(self, shard: int | None = None) -> Path:
        """The part file of `shard` (default: this process's)."""
        k = self.shard if shard is None else shard
        return self.output.with_name(f"{self.output.stem}.shard-{k}-of-{self.shards}{self.output.suffix}")

    def items(self, items: Sequence[Any], shard: int | None = None) -> list[Any]:
        """The items of `shard` (default: this process's): every `shards`-th one from position `shard`."""
        return list(items[self.shard if shard is None else shard :: self.shards])


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r}: expected an integer") from None


def shard_plan(cfg: Mapping[str, Any], output: Path) -> ShardPlan:
    """`shards` / `shard` from the config, else from torchrun's WORLD_SIZE / RANK, else 1 / 0."""
    shards = cfg.get("shards")
    shards = int(shards) if shards is not None else (_env_int("WORLD_SIZE") or 1)
    shard = cfg.get("shard")
    shard = int(shard) if shard is not None else (_env_int("RANK") or 0)
    if shards < 1:
        raise ConfigError(f"shards={shards}: expected a number of processes >= 1")
    if not 0 <= shard < shards:
        raise ConfigError(f"shard={shard}: expected 0 .. {shards - 1} (shards={shards})")
    merge = cfg.get("merge", "auto")
    merge = "off" if merge is False else str(merge)
    if merge not in MERGE_MODES:
        raise ConfigError(f"merge={merge}: expected one of {', '.join(MERGE_MODES)}")
    if merge == "only" and shards < 2:
        raise ConfigError("merge=only needs shards=N (N > 1): the number of part files to merge")
    return ShardPlan(shards, shard, merge, output)


def file_ids(output: Path) -> set[int]:
    """The image ids in a feature file (none when there is no such file yet)."""
    if not output.exists():
        return set()
    from gridvqa.data.features import open_features

    with open_features(output) as r:
        return {int(i) for i in r.image_ids}


def _skipped_ids(part: Path) -> set[int]:
    from gridvqa.extraction import _read_skipped, skipped_path

    return set(_read_skipped(skipped_path(part)))


def _writing(part: Path) -> bool:
    """A writer has the part open, or left it unconsolidated (documented format: `<file>.parts/`)."""
    return Path(f"{part}.parts").exists()


def part_problem(plan: ShardPlan, shard: int, expected: set[int]) -> str | None:
    """Why shard `shard`'s part cannot be merged yet (None: it holds or lists every expected image)."""
    part = plan.part(shard)
    if not expected - _skipped_ids(part):
        return None
    if not part.exists():
        return f"{part} does not exist yet"
    if _writing(part):
        return f"{part} is being written (or was left unfinished: run its shard again)"
    missing = expected - file_ids(part) - _skipped_ids(part)
    if missing:
        return f"{part} lacks {len(missing)} of its {len(expected)} images (run its shard again)"
    return None


def _state(plan: ShardPlan) -> list[tuple[int, ...] | None]:
    """A cheap fingerprint of every part file (changes with each commit: the index is replaced)."""
    out: list[tuple[int, ...] | None] = []
    for k in range(plan.shards):
        try:
            st = plan.part(k).stat()
            out.append((st.st_ino, st.st_mtime_ns, st.st_size, int(_writing(plan.part(k)))))
        except OSError:
            out.append(None)
    return out


def wait_for_parts(plan: ShardPlan, expected: Sequence[set[int]], wait_s: float) -> list[str]:
    """Poll until every part is complete; give up after `wait_s` seconds in which no part file changed.
    Returns the problems left (empty: all complete)."""
    last_state, last_change = None, time.monotonic()
    while True:
        problems = [p for k in range(plan.shards) if (p := part_problem(plan, k, expected[k])) is not None]
        if not problems:
            return []
        state = _state(plan)
        if state != last_state:
            last_state, last_change = state, time.monotonic()
        elif time.monotonic() - last_change > wait_s:
            return problems
        time.sleep(_POLL_S)


def merge_parts(plan: ShardPlan, keep_shards: bool) -> str:
    """Merge the existing part files (and a merged `output` already there) into `output`, combine their
    skipped lists, then delete the parts unless `keep_shards`. Returns what was done, in words."""
    from gridvqa.data.features import merge_feature_files
    from gridvqa.extraction import _read_skipped, _write_skipped, skipped_path

    output = plan.output
    parts = [plan.part(k) for k in range(plan.shards) if plan.part(k).exists()]
    if not parts:
        return f"no part files to merge into {output}"
    if output.exists():
        # merge_feature_files adds to nothing in place: the old file is one of the sources of a new one
        merging = output.with_name(f"{output.stem}.merging{output.suffix}")
        merge_feature_files([output, *parts], merging)
        os.replace(merging, output)
    else:
        merge_feature_files(parts, output)
    done = file_ids(output)
    skipped = _read_skipped(skipped_path(output))
    for part in parts:
        skipped.update(_read_skipped(skipped_path(part)))
    _write_skipped(skipped_path(output), {k: v for k, v in skipped.items() if k not in done})
    if not keep_shards:
        for part in parts:
            part.unlink()
            skipped_path(part).unlink(missing_ok=True)
    kept = "kept" if keep_shards else "removed"
    return f"merged {len(parts)} part files into {output} ({len(done)} images; parts {kept})"


def expected_ids(plan: ShardPlan, items: Sequence[Any], already: set[int]) -> list[set[int]]:
    """Per shard, the image ids its part must hold (those not in the merged file yet)."""
    return [{it.image_id for it in plan.items(items, k)} - already for k in range(plan.shards)]


def merge_when_complete(plan: ShardPlan, items: Sequence[Any], already: set[int], *, wait_s: float,
                        keep_shards: bool) -> str:
    """merge=auto on shard 0: wait for the other parts (see `wait_for_parts`), then merge them."""
    problems = wait_for_parts(plan, expected_ids(plan, items, already), wait_s)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"not merged: {problems[0]}{more}; when all shards are done, run the command with merge=only"
    return merge_parts(plan, keep_shards)


def merge_only(plan: ShardPlan, items: Sequence[Any], keep_shards: bool) -> str:
    """merge=only: every part must be complete now (a DataError names the first that is not)."""
    already = file_ids(plan.output)
    expected = expected_ids(plan, items, already)
    problems = [p for k in range(plan.shards) if (p := part_problem(plan, k, expected[k])) is not None]
    if problems:
        raise DataError(f"cannot merge: {problems[0]}")
    return merge_parts(plan, keep_shards)
