"""Arrow list columns to and from flat numpy arrays (the token columns of the tokenize and pack stages)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def int32_lists(arrays: list[np.ndarray]) -> pa.ListArray:
    """One `list<int32>` entry per array.

    >>> int32_lists([np.array([1, 2]), np.array([], np.int32), np.array([3])]).to_pylist()
    [[1, 2], [], [3]]
    >>> int32_lists([]).type
    ListType(list<item: int32>)
    """
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int32()))


def int32_lists_at(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """`values` cut at `offsets` (n + 1 positions: list i is values[offsets[i]:offsets[i + 1]]) as `list<int32>`.

    >>> int32_lists_at(np.array([0, 2, 2, 3]), np.array([7, 8, 9])).to_pylist()
    [[7, 8], [], [9]]
    """
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), pa.int32()), pa.array(values, pa.int32()))


def flat_lists(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (offsets, values): list i is values[offsets[i]:offsets[i + 1]].

    >>> offsets, values = flat_lists(pa.chunked_array([[[1, 2]], [[], [3]]], pa.list_(pa.int32())))
    >>> offsets.tolist(), values.tolist()
    ([0, 2, 2, 3], [1, 2, 3])
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False)
