"""The read side: a finished build folder, looked at. Nothing here imports the build side (api,
encode, pipeline, templates, formats, readers, store, output, parts, merge; `tests/test_layout.py`);
only the shard contract (`shards`: the row reader, `manifest`, `labels`, `packing`: how a mode's rows
read back), the settings' names (`config`, for diff), the tokenizer loader (`tokenizer`, for decode)
and the tokenizer files the build copied into the folder.

    OUT/manifest.json + shard-train-*.arrow --shards.load--> one memory-mapped table
        --shards.flatten--> Flat (flat ids / labels + pieces) --unpack.unpack--> samples by sample_id
    OUT/samples.feather, rejects.jsonl --folder--> provenance, drops
    OUT/tokenizer/ --decode--> text, trained runs, token strings

    view.py    `sftprep inspect`: a packed row or one sample, decoded, trained text marked
    stats.py   `sftprep stats`: totals, histograms, per input file (and a plot)
    verify.py  `sftprep verify`: checksums and every promise of the shard contract
    diff.py    `sftprep diff`: two builds compared like a code change
    unpack.py  `sftprep.samples()`: one row per sample, unpacked (and decoded)
"""

from ..write.shards import load
from .diff import diff
from .folder import read_build
from .unpack import samples
from .verify import verify

__all__ = ["diff", "load", "read_build", "samples", "verify"]
