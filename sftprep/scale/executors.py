"""Run a build as N parts somewhere else, then merge them: `sftprep build --executor ray`.

Each part is one Ray task that runs the ordinary `build()` with `part=(i, N)` into `PARTS/part-i-of-N/`;
the driver then runs `sftprep.scale.merge` into `--out`. Tasks read the inputs and write the parts by path, so
on a cluster the inputs, the tokenizer and `--out` must lie on storage every node sees (NFS, Lustre, a
mounted bucket), as with a SLURM job array.

A part is deterministic: a task that Ray retries (a node lost) or that is run again rewrites the same
bytes. The parts are removed after a successful merge when they lie in `OUT/.parts` (the default), and
kept when `--parts-dir` names their folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from ..config import BuildConfig, ExecutorConfig
from ..errors import USER_ERRORS, BuildError, ConfigError, MissingExtra

PARTS_DIR = ".parts"  # inside --out unless --parts-dir says otherwise
RAY_EXTRA = "pip install 'sftprep[ray]'"


class PartError(BuildError):
    """A part failed; the message names the part, its records and the cause (file:line where known)."""


def part_dir(parts_dir: Path, i: int, n: int) -> Path:
    return parts_dir / f"part-{i:05d}-of-{n:05d}"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MissingExtra(f"--executor ray needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


def _run_part(config: BuildConfig, allow_code: bool) -> dict[str, Any]:
    """One part, in a Ray worker: an ordinary build. User errors travel back as a (message, type) pair,
    reported by the driver naming the part; anything else is a bug and reaches the driver with its traceback
    (Ray's `RayTaskError`)."""
    from ..api import build

    try:
        return {"manifest": build(config, allow_code=allow_code)}
    except USER_ERRORS as e:
        return {"error": str(e), "type": type(e).__name__}


def build_ray(config: BuildConfig, parts: int | None = None, address: str | None = None,
              parts_dir: str | Path | None = None, allow_code: bool = False,
              progress: Callable[[int], None] | None = None,
              on_part: Callable[[int, int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Build `config` as `parts` Ray tasks (default: one per CPU of the cluster) and merge them into
    `config.out`; return the merged manifest.

    Args:
        address: a Ray cluster to join (`ray://host:10001`, `auto`); none starts Ray on this machine
            (or uses the Ray this process already started).
        parts_dir: where the parts go (default `OUT/.parts`, removed after the merge); a folder given
            here is kept after the merge (a re-run writes the same bytes into it).
        progress: called with each finished part's record count (and first `progress.start(total)`,
            if it has that method, as `build` does).
        on_part: called with (index, count, manifest) as each part finishes.

    Raises:
        ConfigError: `config.part` is set, or `parts` < 1.
        MissingExtra: Ray is not installed (the message names the extra to install).
        PartError: a part failed: which part, which records, why.
    """
    if config.part is not None:
        raise ConfigError("--part builds one part here; --executor ray builds them all: give one of them")
    ExecutorConfig("ray", address, parts, None if parts_dir is None else str(parts_dir))  # checks the values
    ray = _import_ray()
    if hasattr(progress, "start"):  # a progress bar with a total, as `build` gives it
        from ..api import expected_records

        progress.start(expected_records(config))
    started, pending = not ray.is_initialized(), {}
    if started:
        ray.init(address=address, log_to_driver=False, include_dashboard=False, logging_level="ERROR")
    try:
        n = parts or max(1, int(ray.cluster_resources().get("CPU", 1)))
        where = Path(parts_dir) if parts_dir else Path(config.out) / PARTS_DIR
        remote = ray.remote(_run_part).options(max_retries=3, num_cpus=1)
        for i in range(n):
            cfg = dataclasses.replace(config, part=(i, n), out=str(part_dir(where, i, n)), overwrite=True)
            pending[remote.remote(cfg, allow_code)] = i
        done = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            result = _result(ray, ready[0])
            if "error" in result:
                raise PartError(_failed(i, n, config, result["error"]))
            done.append(part_dir(where, i, n))
            if progress:
                progress(result["manifest"]["totals"]["records_read"])
            if on_part:
                on_part(i, n, result["manifest"])
    finally:
        for ref in pending:  # a part failed: the others stop
            ray.cancel(ref)
        if started:
            ray.shutdown()
    from .merge import merge

    manifest = merge(done, config.out, overwrite=config.overwrite)
    if not parts_dir:
        import shutil

        shutil.rmtree(where, ignore_errors=True)
    return manifest


def _result(ray, ref) -> dict[str, Any]:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError:  # a bug in the part's code: keep its traceback
        raise
    except Exception as e:  # noqa: BLE001 (a worker lost for good, a cancelled task)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")}


def _failed(i: int, n: int, config: BuildConfig, error: str) -> str:
    from .parts import describe

    inputs = ", ".join(config.read.inputs)
    return f"part {i}/{n} ({describe((i, n))}: {inputs}) failed: {error}"
