"""sfttrain: train LoRA / QLoRA adapters (or full models) on shards built by `sftprep`.

    from sfttrain import TrainConfig, train, merge
    config = TrainConfig.from_dict({"shards": "shards/", "model": "path/to/model", "output_dir": "runs/x"})
    result = train(config)           # adapter + tokenizer in runs/x/final
    merge(result.final_dir, "merged/")

    from sfttrain import IterativeTrainer   # generate -> filter -> step() on a live model
    t = IterativeTrainer("path/to/model", "runs/it", template="chatml", max_length=1024)
"""

__version__ = "0.1.0"

from .api import TrainResult, merge, setup, train  # noqa: E402
from .attention import AttentionPath, IsolationError  # noqa: E402
from .config import (ConfigError, DataConfig, LoopConfig, LoraConfig, ModelConfig, QuantConfig,  # noqa: E402
                     TrainConfig, config_from_dict)
from .iterative import Generation, IterativeTrainer  # noqa: E402

__all__ = ["AttentionPath", "ConfigError", "DataConfig", "Generation", "IsolationError", "IterativeTrainer",
           "LoopConfig", "LoraConfig", "ModelConfig", "QuantConfig", "TrainConfig", "TrainResult", "config_from_dict",
           "merge", "setup", "train"]
