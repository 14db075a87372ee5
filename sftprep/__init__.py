"""sftprep: raw SFT records -> tokenized, label-masked, packed Arrow shards, built once, offline.

    from sftprep import BuildConfig, build, load

The build: one folder per stage, in the order data flows (`api.build` runs them, each stage with its
own section of `config.BuildConfig`; no stage imports a later one: `tests/test_layout.py`):

    read/       files -> Record (fields, file:line) (readers); Record -> Conversation (formats); benchmark
                n-grams that keep a record out (contamination)
    render/     Conversation -> text + trained character spans (presets, chat templates, plans)
    tokenize/   text -> ids -> labels (encode, labels, boundaries), truncation (window): one batch
    mix/        the recipe on kept samples: duplicates, the validation split, each source's weight (recipe)
    pack/       sample lengths -> rows of pieces (sample, start, stop); its MODES say how rows read back
    write/      samples spilled to disk until packing (store); rows -> shard-train-NNNNN.arrow and the one
                row reader (shards); the output folder: lock, side files, manifest (output, manifest);
                below every stage: writes that name their path, the ledger, overlapping folders (files)
    scale/      batches through threads or --workers processes (pipeline); --part I/N (parts); parts
                0..N-1 -> the build one process would have written (merge); --executor ray (executors)

Beside them: `api` (build, the in-memory build `MemoryBuild`, `chat_template_for`), `config` (the settings),
`tokenizer` (loading a local tokenizer, used by every stage), `errors` (what users see: one line in the
CLI; anything else is a bug and keeps its traceback), `cli`.

The read side, `sftprep.inspect` (samples, view, stats, verify, diff), imports none of the build
modules: only the shard contract (write.shards, write.manifest, tokenize.labels, pack.packing) and the
tokenizer the build copied.
"""


__version__ = "0.1.0"

from .api import build  # noqa: E402
from .config import (BuildConfig, PackConfig, ReadConfig, TemplateConfig, TokenizeConfig,  # noqa: E402
                     config_from_dict)
from .errors import BuildError, ConfigError, InputError, RecordError, UserError  # noqa: E402
from .inspect import samples, verify  # noqa: E402
from .tokenize.labels import IGNORE_INDEX  # noqa: E402
from .write.manifest import read_manifest  # noqa: E402
from .write.shards import load  # noqa: E402

__all__ = ["BuildConfig", "BuildError", "ConfigError", "IGNORE_INDEX", "InputError", "RecordError", "UserError", "PackConfig", "ReadConfig",
           "TemplateConfig", "TokenizeConfig", "build", "config_from_dict", "load", "read_manifest", "samples",
           "verify"]
