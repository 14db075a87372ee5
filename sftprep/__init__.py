"""sftprep: raw SFT records -> tokenized, label-masked, packed Arrow shards, built once, offline.

    from sftprep import BuildConfig, build, load
"""

__version__ = "0.1.0"

from .api import BuildError, build, load  # noqa: E402
from .config import (BuildConfig, ConfigError, PackConfig, ReadConfig, TemplateConfig,  # noqa: E402
                     TokenizeConfig, config_from_dict)
from .labels import IGNORE_INDEX  # noqa: E402
from .manifest import read_manifest  # noqa: E402
from .samples import samples  # noqa: E402
from .verify import verify  # noqa: E402

__all__ = ["BuildConfig", "BuildError", "ConfigError", "IGNORE_INDEX", "PackConfig", "ReadConfig",
           "TemplateConfig", "TokenizeConfig", "build", "config_from_dict", "load", "read_manifest", "samples",
           "verify"]
