"""bench/train_gpu.py runs end to end (a tiny model on CPU): sfttrain and TRL side by side."""

import os
import re
import subprocess
import sys

import pytest

from tests.sfttrain_helpers import ROOT


def test_train_bench_smoke_run_prints_both_rows(tmp_path):
    pytest.importorskip("trl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_gpu.py"), "--tiny", "--steps", "2",
                           "--max-length", "128", "--batch-size", "2", "--workdir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {m.group(1): float(m.group(2).replace(",", ""))
            for m in re.finditer(r"^(sfttrain|TRL [\d.]+ packed \(bfd\))\s+([\d,]+)\s", proc.stdout, re.M)}
    assert len(rows) == 2 and all(v > 0 for v in rows.values()), proc.stdout
    assert "sfttrain / TRL:" in proc.stdout


def test_loss_head_bench_prints_peak_memory_against_hf_full_logits():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "loss_head.py"), "--vocabs", "5000", "--trained", "0.25",
                           "--length", "64"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| ([\d,]+) \| (\d+)% \| [\d,]+ \| [\d,]+ \| [\d.]+ \| ([\d.e+-]+) \|$", proc.stdout, re.M)
    assert [(v, t) for v, t, _ in rows] == [("5,000", "25")]
    assert all(float(diff) < 1e-4 for _, _, diff in rows)  # the same loss as HF's full logits
