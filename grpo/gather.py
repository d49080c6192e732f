"""Host copies of a batch's rows across processes: each process holds a share of every batch,
while metrics, dynamic sampling and the logged completions need all of it (or its own part).
On one process these are plain conversions to numpy."""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def all_rows(x: Any) -> np.ndarray:
    """A global array (or process-local numpy rows) gathered whole onto every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))
    return np.asarray(x)


def agreed_width(rows: list, minimum: int) -> int:
    """The width every process pads its `rows` (sequences) to, one compile for many batches: a
    power of two, `minimum` at least, that holds every process's longest row."""
    longest = int(all_rows(np.array([max(len(row) for row in rows)])).max())
    return max(minimum, 1 << (longest - 1).bit_length())


def summed(count: int | np.integer) -> int:
    """A per-process count summed over every process."""
    return int(all_rows(np.array([count])).sum())


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's contiguous rows of a batch-sharded global array."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = {s.index[0].start or 0: np.asarray(s.data) for s in x.addressable_shards}
    return np.concatenate([shards[k] for k in sorted(shards)])


def all_json(local: list[Any]) -> list[Any]:
    """Every process's JSON-serialisable rows, in process order (gathered as utf-8 bytes)."""
    if jax.process_count() == 1:
        return list(local)
    encoded = [json.dumps(row).encode() for row in local]
    sizes = np.array([len(row) for row in encoded], np.int32)
    width = int(all_rows(np.array([sizes.max(initial=1)])).max())
    padded = np.zeros((len(encoded), width), np.uint8)
    for row, data in zip(padded, encoded, strict=True):
        row[: len(data)] = np.frombuffer(data, np.uint8)
    all_sizes, all_padded = all_rows(sizes), all_rows(padded)
    return [json.loads(bytes(row[:n])) for row, n in zip(all_padded, all_sizes, strict=True)]


def from_process_zero(values: list[int]) -> list[int]:
    """Process 0's ints on every process (say, what it listed in a directory that the others
    may list at another moment, seeing other files)."""
    if jax.process_count() == 1:
        return list(values)
    count = int(multihost_utils.broadcast_one_to_all(np.int32(len(values))))
    padded = np.zeros(count, np.int32)  # the other processes' entries are only placeholders
    padded[: min(count, len(values))] = values[:count]
    return [int(v) for v in multihost_utils.broadcast_one_to_all(padded)]
