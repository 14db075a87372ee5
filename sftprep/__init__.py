"""sftprep: raw SFT records -> tokenized, label-masked, packed Arrow shards, built once, offline.

    from sftprep import BuildConfig, build, load
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
