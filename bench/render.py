#!/usr/bin/env python
"""Benchmark: the chat template stage alone, per family: CPU seconds of `ChatTemplate.segments` over the
benchmark chats (`bench/chat_data.py`), and how many times the template itself rendered them (0 where
every conversation was built from a render plan, `sftprep/render/plans.py`).

    python bench/render.py                         # every family of fixtures/chat_templates, 10k chats
    cp bench/render.py /tmp/before/bench/ && python /tmp/before/bench/render.py   # a checkout of older code

One process, single-threaded, best of `--repeat` passes (plans made afresh in each): process CPU time,
which other work on the machine disturbs less than wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--family", default="all", help="families of fixtures/chat_templates/families.json, or all")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import json

    from bench.chat_data import make_chats
    from sftprep.read.formats import FormatError, normalize
    from sftprep.render.chat import ChatTemplate
    from sftprep.tokenizer import added_strings, chat_variables, load_fast, stop_strings
    from tests.chat_families import FAMILIES, family_path

    with tempfile.TemporaryDirectory() as tmp:
        chats = make_chats(a.samples, Path(tmp) / "chats.jsonl", a.data_dir.parent)
        convs = [normalize(json.loads(line)) for line in open(chats, encoding="utf-8")]
    print(f"{'family':26} {'CPU s':>6} {'renders':>8} {'rejected':>8}   ({len(convs):,} chats, best of {a.repeat})")
    for family in list(FAMILIES) if a.family == "all" else a.family.split(","):
        tok = load_fast(family_path(family))
        chat = ChatTemplate(tok.chat_template, chat_variables(tok), stop_strings(tok),
                            added_strings(tok, special_only=True), added_strings(tok))
        renders, render = [0], chat.render

        def counted(messages, tools, add_generation_prompt=False, template=None, variables=None):
            renders[0] += template is None
            return render(messages, tools, add_generation_prompt, template, variables)
        chat.render = counted
        best = None
        for _ in range(a.repeat):
            chat._plans.clear()
            renders[0] = rejected = 0
            t0 = time.process_time()
            for conv in convs:
                try:
                    chat.segments(conv)
                except FormatError:
                    rejected += 1
            best = min(best or float("inf"), time.process_time() - t0)
        print(f"{family:26} {best:6.2f} {renders[0]:8,} {rejected:8,}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
