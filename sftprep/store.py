"""Tokenized samples between tokenize and pack, spilled to disk so memory stays flat.

Best-fit-decreasing needs every sample's length before the first row can be written. Rather than
holding every token in memory, each encoded batch is appended to a temporary Arrow file in the
output folder; packing then slices the samples back out of its memory map. Only a few numbers per
sample (length, id, provenance) stay in memory.
"""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np
import pyarrow as pa

from .encode import Encoded
from .labels import IGNORE_INDEX

_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])


def _list(values: list[np.ndarray], lengths: np.ndarray) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return pa.LargeListArray.from_arrays(offsets, np.concatenate(values)) if offsets[-1] >= 2**31 \
        else pa.ListArray.from_arrays(offsets.astype(np.int32), np.concatenate(values))


class SampleStore:
    """Append batches while encoding (`add`), then `seal` and read samples by index."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lengths = array("q")
        self.sample_ids = array("q")
        self.num_trained = array("q")
        self.truncated = array("b")
        self.sources: list[str] = []
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, _SCHEMA)
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._where: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, enc: Encoded) -> None:
        if not enc.ids:
            return
        lengths = np.fromiter((len(x) for x in enc.ids), dtype=np.int64, count=len(enc.ids))
        self._writer.write_batch(pa.record_batch([_list(enc.ids, lengths), _list(enc.labels, lengths)],
                                                 schema=_SCHEMA))
        self.lengths.extend(lengths.tolist())
        self.sample_ids.extend(enc.sample_ids)
        self.num_trained.extend(int((lab != IGNORE_INDEX).sum()) for lab in enc.labels)
        self.truncated.extend(enc.truncated)
        self.sources += enc.sources

    def seal(self) -> None:
        """Finish the file and map it back; after this, `ids(i)` and `labels(i)` work."""
        self._writer.close()
        self._sink.close()
        reader = pa.ipc.open_file(pa.memory_map(str(self.path)))
        chunk_of, local = [], []
        for k in range(reader.num_record_batches):
            batch = reader.get_batch(k)
            ids, labels = batch.column(0), batch.column(1)
            self._chunks.append((ids.offsets.to_numpy(), ids.values.to_numpy(), labels.values.to_numpy()))
            chunk_of.append(np.full(len(batch), k, dtype=np.int64))
            local.append(np.arange(len(batch), dtype=np.int64))
        if chunk_of:
            self._where = np.stack([np.concatenate(chunk_of), np.concatenate(local)], axis=1)

    def _span(self, i: int):
        k, j = self._where[i]
        offsets, ids, labels = self._chunks[k]
        return ids, labels, offsets[j], offsets[j + 1]

    def ids(self, i: int) -> np.ndarray:
        ids, _, a, b = self._span(i)
        return ids[a:b]

    def labels(self, i: int) -> np.ndarray:
        _, labels, a, b = self._span(i)
        return labels[a:b]

    def remove(self) -> None:
        if not self._sink.closed:
            self._writer.close()
            self._sink.close()
        self._chunks.clear()
        self.path.unlink(missing_ok=True)
