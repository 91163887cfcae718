"""Every strategy on real GPUs (run on the device machine: `pytest -m "gpu or multigpu" tests/test_gpu_strategies.py`).

Tiny model, real entry points: train -> step checkpoints -> resume to a later step -> the DeepSpeed
checkpoint directory converted to `weights/trainable.safetensors` (`vseg weights`) -> `vseg export`.
Multi-GPU strategies use every visible GPU up to 4 (`multigpu` when more than one). ZeRO-3's LoRA
initialisation under partitioning is checked at step 0 on every rank.

`VSEG_GPU_TEST_MODEL=sa2va_1b` (any real preset) runs the same chain on that real-size architecture with random
weights and 512-px synthetic vessels (SAM-2 at 1024 px), LoRA r128 as in the recipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

GPUS = torch.cuda.device_count()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs CUDA GPUs")]
STRATEGIES = ["single", "ddp", "zero2", "zero2_offload", "zero3", "zero3_offload"]
MODEL = os.environ.get("VSEG_GPU_TEST_MODEL")  # None: the tiny model
REAL_SIZE = [f"model={MODEL}", "data.image_size=512", "++model.init_device=cuda"] if MODEL else []


def _devices(strategy: str) -> int:
    return 1 if strategy == "single" else min(GPUS, 4)


def _train(run_dir, strategy: str, steps: int, extra: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "train.py",
        "trainer=gpu",
        f"strategy={strategy}",
        f"trainer.devices={_devices(strategy)}",
        f"run_dir={run_dir}",
        f"trainer.max_steps={steps}",
        "trainer.accumulate_grad_batches=2",
        "data.num_samples=24",
        "data.batch_size=2",
        "data.val_batch_size=2",
        "data.split.val_fraction=0.25",
        "trainer.val_check_interval=4",
        "trainer.num_sanity_val_steps=1",
        "checkpoint.every_n_steps=2",
        "checkpoint.keep=2",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "model.gradient_checkpointing=true",
        *REAL_SIZE,
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.mark.parametrize(
    "strategy", [pytest.param(s, marks=[pytest.mark.multigpu] if s != "single" else []) for s in STRATEGIES]
)
def test_train_checkpoint_resume_export(tmp_path, strategy):
    run_dir = tmp_path / "run"
    _train(run_dir, strategy, 4)
    ckpts = run_dir / "checkpoints"
    step4 = ckpts / "step0000004.ckpt"
    assert step4.exists() and (ckpts / "last.ckpt").exists()
    first = load_file(run_dir / "weights" / "trainable.safetensors")
    assert first and all(v.dtype == torch.float32 for v in first.values())
    if strategy.startswith("zero"):
        assert step4.is_dir()
        # only trainable weights were written: the model-states files are small next to the frozen base
        size = sum(f.stat().st_size for f in step4.rglob("*model_states.pt"))
        trainable_bytes = sum(v.numel() * 4 for v in first.values())  # the fp32 trainable weights
        assert size < max(50 * 2**20, 1.5 * trainable_bytes), (size, trainable_bytes)
    # The checkpoint converts to exactly the weights the run wrote at the same step.
    out = subprocess.run(
        [sys.executable, "-m", "vseg.cli", "weights", f"ckpt={ckpts / 'last.ckpt'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    converted = load_file(run_dir / "weights" / "trainable.safetensors")
    assert set(converted) == set(first)
    for k in first:
        torch.testing.assert_close(converted[k], first[k], rtol=0, atol=0, msg=k)
    # Resume continues the global step from the newest checkpoint.
    proc = _train(run_dir, strategy, 6)
    assert "resuming from" in proc.stdout + proc.stderr
    assert (ckpts / "step0000006.ckpt").exists()
    second = load_file(run_dir / "weights" / "trainable.safetensors")
    assert any(not torch.equal(first[k], second[k]) for k in first)
    export = subprocess.run(
        [
            sys.executable,
            "-m",
            "vseg.cli",
            "export",
            f"ckpt={run_dir}",
            f"out={tmp_path / 'adapter'}",
            "format=adapter",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


LORA_SCRIPT = r"""
import json, sys
sys.path.insert(0, "tests")
import lightning as L
from conftest import compose_cfg
from vseg.config import load_config
from vseg.training.zero3 import lora_init_report
from vseg.training.run import run, build_trainer
import vseg.training.run as T

class Check(L.Callback):
    def on_train_start(self, trainer, pl_module):
        report = lora_init_report(pl_module.model)
        params = [p for p in pl_module.model.parameters()]
        report["partitioned"] = all(hasattr(p, "ds_id") for p in params)
        report["local_numel"] = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        report["full_numel"] = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
        report["rank"] = trainer.global_rank
        with open(sys.argv[1] + f".{trainer.global_rank}", "w") as f:
            json.dump(report, f)

original = T.build_trainer
def with_check(cfg, run_dir, *args):
    trainer = original(cfg, run_dir, *args)
    trainer.callbacks.append(Check())
    return trainer
T.build_trainer = with_check
cfg = load_config(compose_cfg(sys.argv[2:]))
run(cfg)
"""


def test_zero3_builds_partitioned_with_correct_lora_init(tmp_path):
    script = tmp_path / "lora_check.py"
    script.write_text(LORA_SCRIPT)
    devices = min(GPUS, 4)
    report = tmp_path / "report.json"
    args = [
        "trainer=gpu",
        "strategy=zero3",
        f"trainer.devices={devices}",
        f"run_dir={tmp_path / 'run'}",
        "trainer.max_steps=1",
        "data.num_samples=16",
        "data.batch_size=2",
        "trainer.num_sanity_val_steps=0",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "lora.r=8",
    ]
    proc = subprocess.run(
        [sys.executable, str(script), str(report), *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for rank in range(devices):
        r = json.loads((tmp_path / f"report.json.{rank}").read_text())
        assert r["partitioned"], r
        assert r["max_abs_lora_B"] == 0.0, r  # PEFT's own init wrote into empty shards; ours zeroes B
        assert r["min_max_abs_lora_A"] > 0.0, r
        if devices > 1:
            assert r["local_numel"] < 0.6 * r["full_numel"], r  # each rank holds a shard, not a copy
