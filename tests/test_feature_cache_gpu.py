"""The disk feature cache on every strategy, on real GPUs (device machine:
`pytest -m "gpu or multigpu" tests/test_feature_cache_gpu.py`).

Per strategy, the tiny model through train.py: a run that fills a fresh cache on first visit, then a run
that reads every feature from it (no rank encodes), ending with the same weights. Multi-GPU strategies use
every visible GPU up to 4; under ZeRO-3 the ranks agree on running the partitioned encoders.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

GPUS = torch.cuda.device_count()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs CUDA GPUs")]
STRATEGIES = ["single", "ddp", "zero2", "zero2_offload", "zero3", "zero3_offload"]


def _train(run_dir, strategy: str, cache) -> str:
    devices = 1 if strategy == "single" else min(GPUS, 4)
    cmd = [
        sys.executable,
        "train.py",
        "trainer=gpu",
        f"strategy={strategy}",
        f"trainer.devices={devices}",
        f"run_dir={run_dir}",
        "trainer.max_steps=4",
        "data.num_samples=16",
        "data.repeats=4",
        "data.batch_size=2",
        "data.split.val_fraction=0.25",
        "trainer.val_check_interval=4",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=100",
        "lora.dropout=0",
        "feature_cache.enabled=true",
        f"feature_cache.dir={cache}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "strategy", [pytest.param(s, marks=[pytest.mark.multigpu] if s != "single" else []) for s in STRATEGIES]
)
def test_cache_fills_then_serves_every_rank(tmp_path, strategy):
    cache = tmp_path / "cache"
    _train(tmp_path / "fill", strategy, cache)
    out = _train(tmp_path / "read", strategy, cache)
    ranks = 1 if strategy == "single" else min(GPUS, 4)
    assert out.count("feature cache: sam:") == ranks, out[-3000:]
    assert out.count(" 0 encoded (0 written here") == 2 * ranks  # sam and vision: nothing encoded on any rank
    want = load_file(tmp_path / "fill" / "weights" / "trainable.safetensors")
    got = load_file(tmp_path / "read" / "weights" / "trainable.safetensors")
    assert got.keys() == want.keys()
    for name in want:  # the same features from disk as just encoded: only kernel nondeterminism differs
        torch.testing.assert_close(got[name], want[name], rtol=1e-2, atol=1e-3, msg=name)
