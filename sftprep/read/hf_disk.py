"""A `datasets.Dataset.save_to_disk` folder, read with pyarrow alone (no `datasets` import).

Such a folder holds `state.json` listing its Arrow stream files in order, and `dataset_info.json`.
A `DatasetDict` folder (one sub-folder per split) is refused with the split names to choose from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from . import Record
from ..errors import InputError
from .arrow import batch_rows, iter_batches


def read(path: Path) -> Iterator[Record]:
    state = path / "state.json"
    if not state.exists():
        splits = [p.name for p in path.iterdir() if (p / "state.json").exists()]
        hint = f"; pick a split: {', '.join(str(path / s) for s in sorted(splits))}" if splits else ""
        raise InputError(f"{path} has no state.json, so it is not a saved `datasets.Dataset`{hint}")
    files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    row = 0
    for name in files:
        for batch in iter_batches(path / name):
            for rec in batch_rows(batch, path, row):
                yield Record(rec, f"{path}:row {row}")
                row += 1
