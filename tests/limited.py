"""`sftprep` in a subprocess under a real memory limit (RLIMIT_AS), for inputs built to exhaust memory."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMORY = 1536 << 20  # address space of the process: a normal build fits in it many times over


def sftprep_limited(cwd: Path, *args, timeout: int = 60) -> subprocess.CompletedProcess:
    """`sftprep ARGS` in `cwd`, its address space limited to MEMORY bytes, killed after `timeout` s."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))

    # glibc reserves a 64 MiB malloc arena per thread (the tokenizer's threads): address space that holds no
    # data, and, on some runs, enough of it to pass the limit; two arenas keep the limit on what a build holds
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_ARENA_MAX": "2"}
    return subprocess.run([sys.executable, "-m", "sftprep.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit, env=env, cwd=cwd)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The one `Error: ...` line of a command that exited with code 2, without a traceback."""
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]
