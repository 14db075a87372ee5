"""The chat template the shards were built with, saved with the adapter (sftprep makes it:
`sftprep.api.chat_template_for`; here it is set on the tokenizer that checkpoints and the adapter save)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def attach_build_template(tokenizer, manifest: dict[str, Any], folder: str | Path = ".") -> str | None:
    """Set the build's chat template on `tokenizer` (saved with every checkpoint and the adapter), so the
    adapter is prompted in the turns it was trained on; None when the build used no chat template."""
    from sftprep.api import chat_template_for

    if tokenizer is None:
        return None
    template = chat_template_for(manifest, tokenizer, folder)
    if template:
        tokenizer.chat_template = template
    return template
