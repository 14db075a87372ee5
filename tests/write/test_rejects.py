"""Rejected records are spilled to disk as they come: a build that rejects a million records holds two
numbers for each, not its dict, and rejects.jsonl still lists every one in input order."""

import json
import tracemalloc

from sftprep.api import build
from sftprep.config import config_from_dict
from sftprep.write.rejects import Rejects

from tests.conftest import FIXTURES


def test_rejects_come_back_in_sample_id_order_with_their_counts(tmp_path):
    rejects = Rejects(tmp_path / "tokens.spill.rejects.tmp")
    rejects.add([{"sample_id": 5, "source": "a.jsonl:6", "reason": "too_long", "message": "m5\u2028"},
                 {"sample_id": 2, "source": "a.jsonl:3", "reason": "bad_json", "message": "m2"}])
    rejects.add([{"sample_id": 9, "source": "b.jsonl:1", "reason": "too_long", "message": "m9"}])
    rejects.add([{"sample_id": 7, "source": "a.jsonl:8", "reason": "duplicate", "message": "dup of 1"}])  # late
    assert [r["sample_id"] for r in rejects] == [2, 5, 7, 9]
    assert len(rejects) == 4
    assert rejects.by_reason() == {"too_long": 2, "bad_json": 1, "duplicate": 1}
    assert rejects.by_reason(faults_only=True) == {"too_long": 2, "bad_json": 1}
    assert rejects.first_fault["sample_id"] == 2
    assert [dict(c) for c in rejects.by_source([0, 8])] == [{"too_long": 1, "bad_json": 1, "duplicate": 1},
                                                          {"too_long": 1}]
    assert rejects.count(0, 8) == 3
    rejects.write(tmp_path)
    lines = (tmp_path / "rejects.jsonl").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 5  # U+2028 escaped: one line per reject under any splitter
    assert [json.loads(line)["sample_id"] for line in lines[:-1]] == [2, 5, 7, 9]
    rejects.remove()
    assert not (tmp_path / "tokens.spill.rejects.tmp").exists()


def test_a_build_rejecting_most_records_holds_no_dict_per_reject(tmp_path):
    """60,000 records without a completion and one good one: Python's heap never holds the 60,000 rejects
    (39 MiB at its peak when it held them as dicts, 15 MiB now, 14 of which a build of 10,000 records takes
    too), and rejects.jsonl lists all of them, in input order."""
    data = tmp_path / "d.jsonl"
    with open(data, "w") as f:
        f.write('{"prompt": "hi", "completion": " there"}\n')
        for i in range(60_000):
            f.write(json.dumps({"prompt": f"question {i}", "answer": "not the field"}) + "\n")
    config = config_from_dict({"inputs": [str(data)], "tokenizer": str(FIXTURES / "tokenizers" / "mistral"),
                               "max_length": 64, "out": str(tmp_path / "out"), "max_reject_ratio": 1.0,
                               "cache": False})
    tracemalloc.start()
    try:
        manifest = build(config)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert manifest["totals"]["samples_dropped"] == 60_000
    lines = (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()
    assert [json.loads(line)["sample_id"] for line in lines] == list(range(1, 60_001))
    assert peak < 24 * 2**20, f"peak Python heap {peak / 2**20:.1f} MiB"
