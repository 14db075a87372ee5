"""Arrow arrays to and from numpy, through their buffers: never with `pa.array` or `Array.to_numpy()`,
which import pandas on first use (~0.3 s, a sixth of a build from the sample cache). Here, in the first stage
that writes Arrow (the sample cache), so that every later one (the spill, shards, side tables) uses them too."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def numpy_array(values: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """A zero-copy Arrow view of a numpy array, cast to `dtype` (a number type or bool)."""
    if dtype == pa.bool_():
        bits = np.packbits(np.asarray(values, dtype=bool), bitorder="little")
        return pa.Array.from_buffers(dtype, len(values), [None, pa.py_buffer(bits)])
    values = np.ascontiguousarray(values, dtype=dtype.to_pandas_dtype())
    return pa.Array.from_buffers(dtype, len(values), [None, pa.py_buffer(values)])


def as_numpy(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numpy array of an Arrow array of numbers or bools, without nulls (a view of numbers, bools unpacked
    from their bits); `to_numpy()` would import pandas."""
    if isinstance(values, pa.ChunkedArray):
        parts = [as_numpy(c) for c in values.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, bool if values.type == pa.bool_() else
                                                            values.type.to_pandas_dtype())
    if values.type == pa.bool_():
        if not len(values):
            return np.zeros(0, bool)
        first, skip = divmod(values.offset, 8)
        bits = np.frombuffer(values.buffers()[1], np.uint8, (skip + len(values) + 7) // 8, first)
        return np.unpackbits(bits, bitorder="little")[skip:skip + len(values)].view(bool)
    dtype = np.dtype(values.type.to_pandas_dtype())
    if not len(values):
        return np.zeros(0, dtype)
    return np.frombuffer(values.buffers()[1], dtype, len(values), values.offset * dtype.itemsize)


def string_array(values: list[str]) -> pa.Array:
    """Arrow strings from Python strings."""
    data = [v.encode("utf-8", "backslashreplace") for v in values]
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    if offsets[-1] < 2**31:
        return pa.Array.from_buffers(pa.string(), len(data), [None, pa.py_buffer(offsets.astype(np.int32)),
                                                             pa.py_buffer(b"".join(data))])
    # 2 GiB of text or more: the cast raises (int32 offsets would wrap)
    return pa.Array.from_buffers(pa.large_string(), len(data), [None, pa.py_buffer(offsets),
                                                               pa.py_buffer(b"".join(data))]).cast(pa.string())
