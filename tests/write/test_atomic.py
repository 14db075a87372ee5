"""Interrupted builds: a real build process killed mid-write leaves no manifest (nothing claims to be
complete), and running the same command again finishes the job."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from sftprep import load, read_manifest
from sftprep.write.shards import sha256_file
from tests.conftest import DATA, MISTRAL, write_jsonl


@pytest.fixture
def big_input(tmp_path):
    recs = json.loads((DATA / "alpaca_en.json").read_text())
    return write_jsonl(tmp_path / "big.jsonl", recs * 40)  # 1,600 records


def command(data, out):
    return [sys.executable, "-m", "sftprep.cli", "build", "-i", str(data), "-t", MISTRAL, "--template", "alpaca",
            "--packing", "none", "--shard-size", "1", "-o", str(out), "-q"]


def start_and_stop_midway(data, out, sig):
    proc = subprocess.Popen(command(data, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (out / "shard-train-00100.arrow").exists():  # shards are being written
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "build never reached the writing stage"
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_killed_build_claims_nothing_and_rerun_finishes(tmp_path, big_input, sig):
    out = tmp_path / "out"
    code, err = start_and_stop_midway(big_input, out, sig)
    if sig == signal.SIGTERM:
        assert code == 130 and "Interrupted: nothing was marked complete" in err
    else:
        assert code == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="has shards but no manifest.json: the build did not finish"):
        read_manifest(out)
    with pytest.raises(FileNotFoundError):
        load(out)

    done = subprocess.run(command(big_input, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(out)
    assert manifest["totals"]["samples_kept"] == 1600
    files = sorted(p.name for p in out.glob("shard-*.arrow"))
    assert files == [s["file"] for s in manifest["shards"]]  # no stale or half-written shard left
    assert not list(out.glob("*.tmp"))
    assert all(sha256_file(out / s["file"]) == s["sha256"] for s in manifest["shards"])


# -- disk full / file-size limit: the failed write names its file and leaves no litter ------------

def _spanish_input(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", [{"prompt": f"Question {i}: what is {i} plus {i}?",
                                                  "completion": f" It is {2 * i}."} for i in range(3000)])


def _limited_build(data, out, limit):
    """`sftprep build` in a process whose files may not grow past `limit` bytes (RLIMIT_FSIZE; SIGXFSZ
    ignored, so a write past it fails with EFBIG as a full disk fails with ENOSPC)."""
    import resource

    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, "-m", "sftprep.cli", "build", "-i", str(data), "-t", MISTRAL, "--max-length", "128",
           "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit_files)


# limits at which the build fails writing the token spill, the shard, the tokenizer copy
@pytest.mark.parametrize("limit, failed", [(200_000, "tokens.spill.ids.tmp"), (500_000, "shard-train-00000.arrow"),
                                           (1_000_000, "tokenizer.tmp/tokenizer.json")])
def test_file_size_limit_names_the_file_and_leaves_no_temp_file(tmp_path, limit, failed):
    out = tmp_path / "out"
    result = _limited_build(_spanish_input(tmp_path), out, limit)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"Error: File too large: {out / failed}"
    assert not (out / "manifest.json").exists()
    assert [p.name for p in out.glob("*.tmp")] == []
    assert [p.name for p in out.glob("*/*.tmp")] == []


def test_disk_full_names_the_file_and_leaves_no_partial_manifest(tmp_path, monkeypatch):
    """ENOSPC at the true edge (the fsync of the manifest's temporary file): the message names
    manifest.json, and neither manifest.json nor its .tmp is left."""
    import errno
    import os

    from sftprep import build, config_from_dict

    real_fsync = os.fsync

    def full_disk(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("manifest.json.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    out = tmp_path / "out"
    cfg = config_from_dict({"inputs": [str(_spanish_input(tmp_path))], "tokenizer": MISTRAL, "out": str(out)})
    with pytest.raises(OSError) as e:
        build(cfg)
    assert (e.value.strerror, e.value.filename) == ("No space left on device", str(out / "manifest.json"))
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))


def test_disk_full_while_writing_a_shard(tmp_path, monkeypatch):
    import errno

    import sftprep.write.shards
    from sftprep import build, config_from_dict

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sftprep.write.shards._HashingFile, "write", full_disk)
    out = tmp_path / "out"
    cfg = config_from_dict({"inputs": [str(_spanish_input(tmp_path))], "tokenizer": MISTRAL, "out": str(out)})
    with pytest.raises(OSError, match=r"No space left on device: '.*shard-train-00000.arrow'"):
        build(cfg)
    assert sorted(p.name for p in out.iterdir()) == [".build_id", ".ledger", ".lock"]
