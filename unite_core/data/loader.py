"""The training loop's data path: which samples each optimizer step uses, and how they reach the device.

Data order (exact resume depends on it, and it does not depend on how batches are delivered):

* Step ``s`` uses ``step_indices(s, n, batch, seed)``: epoch ``e = s // (n // batch)`` is a
  ``torch.randperm(n)`` drawn from a generator seeded by ``(seed, e)``; step ``s`` takes block
  ``s mod (n // batch)`` of ``batch`` indices (an epoch's last partial block is dropped).
* Rank ``r`` of ``W`` takes ``idx[r::W]`` and splits it into ``grad_accum`` micro-batches
  (``Tensor.chunk``).
* Per-epoch augmentation (flips) is a pure function of ``(split_seed, epoch, index)``; the epoch travels
  with each micro-batch (:class:`MicroBatchKey`), so worker processes need no epoch bookkeeping.

Delivery (:class:`StepBatches`): datasets that read or decode on access (``lazy = True``: image folders,
shards) are fetched by a ``torch.utils.data.DataLoader`` with ``num_workers`` worker processes, each
building one whole micro-batch (``fetch``), ``prefetch_factor`` micro-batches per worker in flight, into
pinned memory when training on CUDA. In-memory sets (the embedded images and molecules: one indexing
op per batch, ~0.1 ms) are fetched in the training thread, which is faster than any worker round trip
(benchmarks/input_pipeline.py measures both). The DataLoader returns batches in sampler order, so both
ways deliver the same tensors in the same order.

torch's DistributedSampler shards one epoch permutation by rank and knows nothing of optimizer steps,
gradient accumulation or the resume step, so it cannot reproduce this order; :class:`StepSampler` is the
few lines that do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from unite_core.data.errors import DataError

__all__ = [
    "MicroBatchKey",
    "StepSampler",
    "StepBatches",
    "collate",
    "epoch_of_step",
    "fetch",
    "loader_workers",
    "move",
    "step_indices",
    "step_plan",
]


# ----------------------------------------------------------------------------------------------
# Order
# ----------------------------------------------------------------------------------------------
def step_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Global sample indices of optimizer step `step`: epoch-wise permutations, last partial dropped."""
    if batch > n:
        raise DataError(f"train.batch_size={batch} exceeds the {n} training samples: lower train.batch_size")
    per_epoch = n // batch
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[pos * batch : (pos + 1) * batch]


def epoch_of_step(step: int, n: int, batch: int) -> int:
    return step // max(1, n // batch)


@dataclass(frozen=True)
class MicroBatchKey:
    """One micro-batch of one rank: what a worker needs to build it (plain data, cheap to pickle)."""

    step: int
    part: int  # 0 .. grad_accum - 1
    epoch: int
    indices: np.ndarray  # int64 dataset indices


def step_plan(step: int, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
              grad_accum: int = 1) -> list[MicroBatchKey]:
    """The micro-batches of `step` for `rank`, in the order they are trained on."""
    local = step_indices(step, n, batch_size, seed)[rank::world_size]
    epoch = epoch_of_step(step, n, batch_size)
    return [MicroBatchKey(step, k, epoch, chunk.numpy().astype(np.int64))
            for k, chunk in enumerate(local.chunk(grad_accum))]


class StepSampler(Sampler):
    """Micro-batch keys of steps [start, end) for one rank (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 grad_accum: int = 1, start: int = 0, end: int):
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size, self.grad_accum = int(rank), int(world_size), int(grad_accum)
        self.start, self.end = int(start), int(end)

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.grad_accum

    def __iter__(self) -> Iterator[MicroBatchKey]:
        for s in range(self.start, self.end):
            yield from step_plan(s, self.n, self.batch_size, self.seed, self.rank, self.world_size, self.grad_accum)


# ----------------------------------------------------------------------------------------------
# Building batches
# ----------------------------------------------------------------------------------------------
def collate(items):
    first = items[0]
    if isinstance(first, dict):
        return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in first}
    return tuple(torch.stack([torch.as_tensor(it[i]) for it in items]) for i in range(len(first)))


def move(batch, device):
    """A batch on `device` (copies are non-blocking from pinned memory); a raw batch (uint8 images,
    see unite_core.data.images.RawImages) is converted to model space there."""
    if hasattr(batch, "finish"):
        return batch.to(device, non_blocking=True).finish()
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return tuple(v.to(device, non_blocking=True) for v in batch)


def fetch(dataset, indices: torch.Tensor):
    """A batch from a dataset; tensor-backed datasets index in one go (fast path)."""
    getter = getattr(dataset, "get_batch", None)
    if getter is not None:
        return getter(indices)
    return collate([dataset[int(i)] for i in indices])


def loader_workers(dataset, num_workers: int) -> int:
    """Worker processes used for `dataset`: `num_workers` for lazy (decoding/reading) sets, else 0."""
    return int(num_workers) if getattr(dataset, "lazy", False) else 0


@dataclass
class _Failed:
    """A DataError raised in a worker, carried back as data: DataLoader would re-raise it with the
    worker's traceback folded into the message, and the user is owed one line."""

    message: str


class _MicroBatches(Dataset):
    """Map-style view whose items are whole micro-batches: ``self[key] = fetch(dataset, key.indices)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: MicroBatchKey):
        ds = self.dataset
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(key.epoch)
        indices = torch.from_numpy(key.indices)
        try:
            raw = getattr(ds, "get_raw_batch", None)  # image folders, shards: uint8, converted on the device
            return raw(indices) if raw is not None else fetch(ds, indices)
        except DataError as exc:
            if get_worker_info() is None:
                raise
            return _Failed(str(exc))


def _as_is(batch):
    return batch


def _pin(batch):
    if hasattr(batch, "pin_memory"):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: v.pin_memory() for k, v in batch.items()}
    return tuple(v.pin_memory() for v in batch)


class StepBatches:
    """The micro-batches of steps [start, end) of one rank, in training order.

    ``num_workers > 0``: a DataLoader with that many worker processes builds them ahead of the training
    thread (``prefetch_factor`` micro-batches each), pinned when ``pin_memory``. ``0``: each is built
    in the calling thread when it is asked for. :meth:`take` hands out one step's micro-batches; a step
    that was not taken completely (an exception mid-step) leaves the object unusable for the next step
    (:meth:`ready_for` is False) and the caller opens a new one at the step it resumes from.
    """

    def __init__(self, dataset, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 grad_accum: int = 1, start: int = 0, end: int, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 2):
        self.sampler = StepSampler(len(dataset), batch_size, seed, rank=rank, world_size=world_size,
                                   grad_accum=grad_accum, start=start, end=end)
        self.grad_accum = int(grad_accum)
        self.next_step = int(start)
        self.end = int(end)
        self.num_workers = int(num_workers)
        self._broken = False
        view = _MicroBatches(dataset)
        if self.num_workers > 0:
            loader = DataLoader(view, sampler=self.sampler, batch_size=None, collate_fn=_as_is,
                                num_workers=self.num_workers, prefetch_factor=prefetch_factor,
                                pin_memory=pin_memory, persistent_workers=False)
            self._it: Optional[Iterator[Any]] = iter(loader)
        else:
            pin = _pin if pin_memory else _as_is
            self._it = (pin(view[key]) for key in self.sampler)

    def ready_for(self, step: int) -> bool:
        return self._it is not None and not self._broken and step == self.next_step and step < self.end

    def take(self, step: int) -> Iterator[Any]:
        """Yield the grad_accum micro-batches of `step` (which must be `next_step`)."""
        if not self.ready_for(step):
            raise RuntimeError(f"StepBatches holds steps {self.next_step}..{self.end - 1}, not step {step}")
        self._broken = True  # until every micro-batch of the step has been handed out
        for _ in range(self.grad_accum):
            yield self._next()
        self._broken = False
        self.next_step += 1
        if self.next_step >= self.end:
            self.close()

    def _next(self):
        try:
            batch = next(self._it)
        except RuntimeError as exc:
            if "DataLoader worker" in str(exc):  # killed (out of memory) or exited
                first = str(exc).strip().splitlines()[0]
                raise DataError(
                    f"a data-loading worker process ended unexpectedly ({first}): lower data.num_workers "
                    "(each worker holds a few decoded batches in memory) or set data.num_workers=0"
                ) from None
            raise
        if isinstance(batch, _Failed):
            raise DataError(batch.message)
        return batch

    def close(self) -> None:
        """Stop the worker processes (if any); the object is unusable afterwards."""
        it, self._it = self._it, None
        # the DataLoader iterator stops its workers when collected; say so now, in case a traceback
        # still references it (torch has no public close())
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        del it

    def __del__(self):  # noqa: D105 - workers must not outlive their owner
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
