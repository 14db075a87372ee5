"""A preset as a Jinja chat template: what sfttrain saves with an adapter trained on a preset's turns.

An adapter trained on ChatML turns must be prompted in ChatML. The build records its template in
the manifest; `sftprep.api.chat_template_for` turns it into a tokenizer `chat_template` (sfttrain sets
it on the tokenizer it saves), so that `tokenizer.apply_chat_template(messages)` writes the turns as the
model saw them in training:

- a named preset (chatml, alpaca, mistral, ...): a Jinja template generated from the preset's
  turn formats; it writes BOS itself where that gives the training ids with
  `apply_chat_template(tokenize=True)`, else the tokenizer adds it when its text is tokenized;
- `tokenizer` (the build tokenizer's own template): that template;
- anything else (format strings, a Python callable, plain text): no chat template is written;
  `sfttrain.json` still records what the build used.
"""

from __future__ import annotations

import json
from .presets import Preset


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
