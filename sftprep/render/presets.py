"""Named chat templates.

Each preset says how every turn is written. `{content}` is the turn's text, `{eos}` the tokenizer's
EOS string. The assistant turn is `assistant + content + eot + after`: `content + eot` is trained
(the model must learn to stop), `assistant` (the header) and `after` (a separator) are not.
No preset writes BOS: the tokenizer adds exactly one, at the start.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    user: str
    assistant: str
    eot: str
    after: str = ""
    system: str = "{content}\n\n"
    system_in_user: str | None = None  # models without a system turn put it inside the first user turn
    default_system: str | None = None
    tool: str | None = None  # observation / tool result turn; defaults to the user format
    tool_call: str = "{content}"  # how an assistant function call is written inside its turn
    tools: str = "{system}\n\nYou have access to the following functions:\n{tools}"
    markers: tuple[str, ...] = ()  # strings meant to be single special tokens (warned about when not)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "chatml",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            user="<|im_start|>user\n{content}<|im_end|>\n",
            tool="<|im_start|>tool\n{content}<|im_end|>\n",
            assistant="<|im_start|>assistant\n",
            eot="<|im_end|>",
            after="\n",
            tool_call="<tool_call>\n{content}\n</tool_call>",
            markers=("<|im_start|>", "<|im_end|>"),
        ),
        Preset(
            "alpaca",
            default_system="Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.",
            user="### Instruction:\n{content}\n\n",
            tool="### Observation:\n{content}\n\n",
            assistant="### Response:\n",
            eot="{eos}",
            after="\n\n",
        ),
        Preset(
            "vicuna",
            default_system="A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions.",
            system="{content} ",
            user="USER: {content} ",
            tool="OBSERVATION: {content} ",
            assistant="ASSISTANT: ",
            eot="{eos}",
        ),
        Preset(  # the style of the TRL SFTTrainer docs: f"### Question: {q}\n ### Answer: {a}"
            "qa",
            system="{content}\n",
            user="### Question: {content}\n ",
            tool="### Observation: {content}\n ",
            assistant="### Answer: ",
            eot="{eos}",
            after="\n",
        ),
        Preset(  # Mistral instruct, as its own template writes it: <s>[INST] q [/INST] a</s>[INST] q2 [/INST] a2</s>
            # (the space before the answer keeps its first character out of a `]{`-style merge with [/INST])
            "mistral",
            user="[INST] {content} [/INST]",
            system_in_user="{system}\n\n{content}",
            assistant=" ",
            eot="{eos}",
        ),
        Preset(  # Llama-2 chat, with one BOS for the whole conversation
            "llama2",
            user="[INST] {content} [/INST]",
            system_in_user="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
            assistant=" ",
            eot=" {eos}",
        ),
    ]
}
