"""sftprep: raw SFT records -> tokenized, label-masked, packed Arrow shards, built once, offline.

    from sftprep import BuildConfig, build, load

The build: one module per stage, in the order data flows (`api.build` runs them, each stage with
its own section of `config.BuildConfig`):

    readers/    files -> Record (fields, file:line)
    formats     Record -> Conversation                      normalize
    templates/  Conversation -> text + trained char spans   render
    encode      text -> ids (tokenizer) -> labels (labels)  tokenize, label, truncate: one batch
    pipeline    batches through encode, into store          (threads or --workers processes)
    store       samples spilled to disk until packing
    packing     lengths -> rows of pieces (sample, start, stop); its MODES say how rows read back
    shards      rows -> shard-train-NNNNN.arrow, and the one row reader (flatten, row_positions)
    output      the output folder: lock, side files, build_manifest; manifest: manifest.json, last
    files       below every stage: writes that name their path, the ledger, overlapping folders

Scaling out: `parts` (--part I/N keeps every N-th record), `merge` (parts 0..N-1 -> the build one
process would have written: their samples read back from the shards and packed again), `executors`
(--executor ray: the parts as Ray tasks, then the merge).

The read side, `sftprep.inspect` (samples, view, stats, verify, diff), imports none of the build
modules: only the shard contract (shards, manifest, labels, packing) and the tokenizer the build copied.
`errors` holds what users see (one line in the CLI); anything else is a bug and keeps its traceback.
"""

__version__ = "0.1.0"

from .api import build  # noqa: E402
from .config import (BuildConfig, PackConfig, ReadConfig, TemplateConfig, TokenizeConfig,  # noqa: E402
                     config_from_dict)
from .errors import BuildError, ConfigError, InputError, RecordError, UserError  # noqa: E402
from .labels import IGNORE_INDEX  # noqa: E402
from .manifest import read_manifest  # noqa: E402
from .inspect import samples, verify  # noqa: E402
from .shards import load  # noqa: E402

__all__ = ["BuildConfig", "BuildError", "ConfigError", "IGNORE_INDEX", "InputError", "RecordError", "UserError", "PackConfig", "ReadConfig",
           "TemplateConfig", "TokenizeConfig", "build", "config_from_dict", "load", "read_manifest", "samples",
           "verify"]
