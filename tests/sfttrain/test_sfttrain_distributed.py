"""Distributed for real: two CPU processes under torchrun (gloo) form one job whose steps equal
one process's with the same global batch; WORLD_SIZE without a process group is refused."""

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from safetensors.torch import load_file

from sfttrain import train
from sfttrain.cli import main
from tests.sfttrain_helpers import ROOT, build_shards, one_thread, tiny_model, train_config  # noqa: F401

PAIRS = [(f"Item {i}: what number comes after {i}?", f" {i + 1}" + " indeed" * (i % 3)) for i in range(8)]
FLAGS = dict(max_steps=2, optim="sgd", learning_rate=1.0, lr_scheduler="constant", max_grad_norm=0, lora_r=2)


def test_two_cpu_processes_equal_one_with_the_same_global_batch(tmp_path, tiny_model, one_thread):  # noqa: F811
    shards = build_shards(tmp_path, PAIRS, packing="none")  # 8 rows of 2-5 trained tokens each
    one = train(train_config(shards, tiny_model, tmp_path / "one", per_device_batch_size=4, **FLAGS),
                disable_tqdm=True)

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    args = ["--model", tiny_model, "--output-dir", tmp_path / "two", "--per-device-batch-size", 2,
            "--max-steps", 2, "--optim", "sgd", "--learning-rate", 1.0, "--lr-scheduler", "constant",
            "--max-grad-norm", 0, "--lora-r", 2, "--lora-alpha", 8, "--lora-dropout", 0, "--seed", 0,
            "--logging-steps", 1, "--save-steps", 1000]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sfttrain.cli", "run", shards, *args]
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x2 ranks" in proc.stderr and proc.stderr.count("done: 2 steps") == 1  # one job, one voice

    a, b = load_file(str(Path(one.final_dir) / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "two" / "final" / "adapter_model.safetensors"))
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3  # the steps moved the adapter
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-5, k


def test_world_size_without_a_process_group_is_refused(tmp_path, tiny_model, monkeypatch):  # noqa: F811
    shards = build_shards(tmp_path, PAIRS[:2], packing="none")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    result = CliRunner().invoke(main, ["run", str(shards), "--model", str(tiny_model), "--output-dir",
                                       str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "WORLD_SIZE=2 is set but this process joined a job of 1" in result.output
    assert "torchrun" in result.output
    assert not (tmp_path / "r" / "final").exists()


def test_leaving_the_job_frees_the_wrapper_that_holds_the_process_group(tmp_path, monkeypatch):
    """The group must go while the interpreter is whole: a finished Trainer's DDP wrapper (kept alive by a
    reference cycle, as the Trainer's are) holds it past `destroy_process_group`, and left to the interpreter's
    exit gloo's threads can abort the rank. After `sfttrain run` leaves the job, no wrapper is left."""
    import weakref

    import torch
    import torch.distributed as dist

    from sfttrain.cli import _leave_process_group

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        wrapped.cycle = {"trainer": wrapped}  # freed only by the garbage collector
        alive = weakref.ref(wrapped)
        del wrapped
        assert alive() is not None
        _leave_process_group(finished=True)
        assert not dist.is_initialized() and alive() is None
    finally:  # no group left behind for the tests after this one
        if dist.is_initialized():
            dist.destroy_process_group()
