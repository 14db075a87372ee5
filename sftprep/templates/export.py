"""The chat template a build's samples were rendered with, as Jinja: what sfttrain saves with an adapter.

An adapter trained on ChatML turns must be prompted in ChatML. The build records its template in
the manifest; `chat_template_for` turns it into a tokenizer `chat_template` (sfttrain sets it on the
tokenizer it saves), so that `tokenizer.apply_chat_template(messages)` writes the turns as the model
saw them in training:

- a named preset (chatml, alpaca, mistral, ...): a Jinja template generated from the preset's
  turn formats; it writes BOS itself where that gives the training ids with
  `apply_chat_template(tokenize=True)`, else the tokenizer adds it when its text is tokenized;
- `tokenizer` (the build tokenizer's own template): that template;
- anything else (format strings, a Python callable, plain text): no chat template is written;
  `sfttrain.json` still records what the build used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..manifest import tokenizer_dir
from .presets import PRESETS, Preset


def _lit(text: str) -> str:
    return json.dumps(text)  # a Jinja string literal (same escapes as JSON)


def preset_jinja(preset: Preset, eos: str, bos: str | None, system: str | None = None) -> str:
    """Jinja for `preset`, mirroring how sftprep renders
    turns: system (or the preset's default) first or merged into the first user turn; assistant
    turns as header + content + end-of-turn + separator; tool results in the tool format."""
    default = system if system is not None else preset.default_system
    eot = preset.eot.replace("{eos}", eos)
    tool = preset.tool or preset.user
    siu = preset.system_in_user
    lines = [
        "{%- set ns = namespace(system=" + (_lit(default) if default else "none") + ", merged=false) -%}",
        "{%- set msgs = messages -%}",
        "{%- if msgs and msgs[0]['role'] == 'system' -%}{%- set ns.system = msgs[0]['content'] -%}"
        "{%- set msgs = msgs[1:] -%}{%- endif -%}",
        "{{- bos_token -}}" if bos else "",
    ]
    if not siu:
        lines.append("{%- if ns.system -%}{{- " + _lit(preset.system) + "|replace('{content}', ns.system) -}}"
                     "{%- endif -%}")
    lines += [
        "{%- for m in msgs -%}",
        "{%- if m['role'] == 'assistant' -%}",
        "{{- " + _lit(preset.assistant) + " ~ m['content'] ~ " + _lit(eot) + " ~ " + _lit(preset.after) + " -}}",
        "{%- else -%}",
        "{%- set content = m['content'] -%}",
    ]
    if siu:
        lines.append("{%- if m['role'] == 'user' and ns.system and not ns.merged -%}{%- set content = "
                     + _lit(siu) + "|replace('{system}', ns.system)|replace('{content}', content) -%}"
                     "{%- set ns.merged = true -%}{%- endif -%}")
    lines += [
        "{%- if m['role'] == 'tool' -%}{{- " + _lit(tool) + "|replace('{content}', content) -}}",
        "{%- else -%}{{- " + _lit(preset.user) + "|replace('{content}', content) -}}{%- endif -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- " + _lit(preset.assistant) + " -}}{%- endif -%}",
    ]
    return "\n".join(line for line in lines if line)


def chat_template_for(manifest: dict[str, Any], tokenizer, folder: str | Path = ".") -> str | None:
    """The chat template matching the build's (the build in `folder`; `tokenizer` a transformers
    tokenizer of the build's vocabulary), or None when the build used no chat template."""
    cfg = (manifest.get("config") or {}).get("template") or {}
    name = cfg.get("name")
    if cfg.get("prompt") is not None or cfg.get("response_template") or not name:
        return None
    if name == "tokenizer":
        return _tokenizer_template(manifest, folder) or getattr(tokenizer, "chat_template", None)
    preset = PRESETS.get(name)
    if preset is None:
        return None
    plain = preset_jinja(preset, eos=tokenizer.eos_token or "", bos=None, system=cfg.get("system"))
    if not tokenizer.bos_token:
        return plain
    # With BOS written by the template, apply_chat_template(tokenize=True) gives the training ids, unless
    # the tokenizer treats text after a special token differently (SentencePiece's prefix space): then the
    # template leaves BOS to the tokenizer (tokenize its text output with special tokens).
    with_bos = preset_jinja(preset, eos=tokenizer.eos_token or "", bos=tokenizer.bos_token, system=cfg.get("system"))
    probe = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]
    try:
        from jinja2 import Template

        text = Template(plain).render(messages=probe, add_generation_prompt=False, bos_token=tokenizer.bos_token)
        same = (tokenizer(text).input_ids ==
                tokenizer(tokenizer.bos_token + text, add_special_tokens=False).input_ids)
    except Exception:  # noqa: BLE001 - any failure: keep the plain template
        return plain
    return with_bos if same else plain


def _tokenizer_template(manifest: dict[str, Any], build: str | Path) -> str | None:
    folder = tokenizer_dir(build, manifest)
    if folder is None:
        return None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None
