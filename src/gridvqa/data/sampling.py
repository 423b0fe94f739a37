"""Samplers and a loader for exact distributed evaluation and exact mid-epoch resume.

- `ShardSampler`: this process's share of a map-style dataset. Training order is a function of
  (seed, epoch) only; training shards are padded to equal sizes so that DDP ranks step in lockstep;
  evaluation shards are not padded, so every item is scored exactly once over all ranks (Lightning's
  own DistributedSampler repeats items to even out the last shard, which changes the metric).
- `ResumableDataLoader`: a DataLoader with `state_dict`/`load_state_dict`. Lightning saves the state
  of a loader that has both in the checkpoint's loop state and gives it back on resume, so a run
  killed mid-epoch continues with the batch that would have come next.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

log = logging.getLogger(__name__)


def global_seed() -> int:
    """The seed `seed_everything` set (Lightning passes it to DDP processes as PL_GLOBAL_SEED), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class ShardSampler(DistributedSampler):
    """Indices of one rank's shard: shuffled by (seed, epoch) for training, in order for evaluation.

    `pad=True` (training): the permutation is extended by its own first items to a multiple of
    `num_replicas`, so every rank gets the same number of items and batches.
    `pad=False` (evaluation): rank r takes items r, r + R, r + 2R, ... of the dataset: no item twice.

    A DistributedSampler subclass so that Lightning keeps it as it is (it only wraps samplers that
    are not one), whatever `use_distributed_sampler` says.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = False,
        seed: int = 0,
        pad: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.pad = pad
        n = len(dataset)  # type: ignore[arg-type]
        if pad:
            self.num_samples = -(-n // num_replicas)
        else:
            self.num_samples = len(range(rank, n, num_replicas))
        self.total_size = self.num_samples * num_replicas if pad else n
        self.skip = 0  # items of this shard to leave out once, at the next iteration (resume)

    def order(self) -> list[int]:
        """This rank's whole shard for the current epoch (what `skip` counts into)."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        if self.pad and self.total_size > n:
            indices = (indices * -(-self.total_size // n))[: self.total_size]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(self.order()[skip:])

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ShardSampler` that knows how many batches of which epoch it has handed out.

    The iterator is made lazily, at the first batch: Lightning creates the train iterator on resume
    before it calls `set_epoch`, and the order must be the one of the restored epoch. Each loader
    draws its worker seeds from its own generator (reseeded per epoch), not from the global RNG, so
    creating an iterator at a different moment (as a resumed run does) leaves dropout & co. alone.
    """

    def __init__(self, dataset: Dataset, sampler: ShardSampler, **kwargs: Any) -> None:
        if not isinstance(sampler, ShardSampler):
            raise TypeError("ResumableDataLoader needs a ShardSampler")
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._epoch = sampler.epoch
        self._consumed = 0  # batches of `_epoch` handed out
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        sampler: ShardSampler = self.sampler  # type: ignore[assignment]
        start = 0
        if self._resume is not None:
            epoch, batches = self._resume
            self._resume = None
            if epoch == sampler.epoch:
                start = batches
        sampler.skip = start * (self.batch_size or 1)
        self._epoch, self._consumed = sampler.epoch, start
        self.generator.manual_seed(sampler.seed + sampler.epoch)
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: ShardSampler = self.sampler  # type: ignore[assignment]
        return {
            "epoch": self._epoch,
            "batches": self._consumed,
            "batch_size": int(self.batch_size or 1),
            "num_replicas": sampler.num_replicas,
            "seed": sampler.seed,
            "dataset_len": len(self.dataset),  # type: ignore[arg-type]
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: ShardSampler = self.sampler  # type: ignore[assignment]
        mine = self.state_dict()
        keys = ("batch_size", "num_replicas", "seed", "dataset_len")
        changed = [k for k in keys if state.get(k) != mine[k]]
        if changed:
            log.warning(
                "resuming with a different %s than the checkpoint: the rest of epoch %d is not the data the "
                "interrupted run would have seen", ", ".join(changed), state["epoch"],
            )
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # saved after the epoch's last batch: the next epoch starts afresh
            epoch, batches = epoch + 1, 0
        sampler.set_epoch(epoch)
        self._resume = (epoch, batches)
        self._epoch, self._consumed = epoch, batches
