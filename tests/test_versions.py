"""The installed libraries are inside pyproject's ranges, and what sfttrain relies on beyond the documented
API of transformers is there (a new major version fails here first, by name, not mid-training)."""

from __future__ import annotations

import re
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _dependencies() -> list[Requirement]:
    if sys.version_info >= (3, 11):
        import tomllib

        deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    else:  # pragma: no cover
        text = PYPROJECT.read_text()
        deps = re.findall(r'^\s+"([^"]+)",', text.split("dependencies = [", 1)[1].split("]", 1)[0], re.M)
    return [Requirement(d) for d in deps]


def test_installed_versions_are_inside_the_ranges_pyproject_declares():
    for req in _dependencies():
        if req.marker is not None and not req.marker.evaluate():
            continue
        have = version(req.name).split("+")[0]
        assert req.specifier.contains(have, prereleases=True), f"{req.name} {have} is outside {req.specifier}"


@pytest.mark.slow  # imports transformers.Trainer
def test_what_sfttrain_relies_on_beyond_the_documented_api_is_there():
    import inspect

    from transformers import AttentionInterface, Trainer, TrainerCallback
    from transformers.masking_utils import find_packed_sequence_indices  # positions path: packed mask from ids
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # sdpa support check
    from transformers.training_args import OptimizerNames  # --optim validation

    assert "compute_loss_func" in inspect.signature(Trainer.__init__).parameters
    assert callable(TrainerCallback.on_epoch_begin) and callable(find_packed_sequence_indices)
    assert "llama" in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and "adamw_torch" in [o.value for o in OptimizerNames]
    assert hasattr(AttentionInterface, "register")


@pytest.mark.slow  # imports transformers.Trainer
def test_the_trainer_internals_iterative_training_drives_are_there():
    """`IterativeTrainer` runs one optimizer step at a time through the pieces `Trainer._run_epoch` uses
    (private: pinned by pyproject's transformers<6); a release that renames one fails here, by name."""
    from accelerate.state import GradientState
    from transformers import Trainer

    import sfttrain.iterative

    source = Path(sfttrain.iterative.__file__).read_text()
    used = set(re.findall(r"\btr\.(_[a-z_]+)\(", source))
    assert {"_clip_grad_norm", "_get_num_items_in_batch", "_maybe_log_save_evaluate", "_save_checkpoint"} <= used
    missing = sorted(name for name in used if not callable(getattr(Trainer, name, None)))
    assert not missing, f"transformers.Trainer no longer has {missing}"
    assert callable(getattr(GradientState, "_set_sync_gradients", None))
