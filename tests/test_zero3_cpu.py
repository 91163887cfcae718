"""DeepSpeed ZeRO-3 on the CPU: the partitioned tiny Sa2VA computes what the unpartitioned one does, trains,
and its checkpoint directory reads back (predict.py's reader) as the exact fp32 trainable weights.

Guards the reads ZeRO-3 does not see (PEFT's trainable-token layers, SAM-2's embedding tokens and
no-memory embedding; `vseg.training.zero3.zero3_register_reads`): without them the first forward fails on an
empty partition. Runs in a subprocess because DeepSpeed picks its accelerator at import.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("deepspeed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied_head", "untied_head"])
def test_zero3_partitioned_sa2va_matches_and_trains(tied):
    """Both head layouts: an untied LM head (Sa2VA-8B/26B) has its own token-row layer, a tied one reads the
    embedding's rows; each failed differently on GPUs before their reads were registered."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    worker = ROOT / "tests" / "workers" / "zero3_cpu.py"
    proc = subprocess.run(
        [sys.executable, str(worker), str(_free_port()), f"model.tie_word_embeddings={str(tied).lower()}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(lines[-1][len("REPORT ") :])
    assert report["partitioned_params"] > 0  # ZeRO-3 really emptied the parameters
    # LoRA initialised under partitioning: B all zero, every A drawn
    assert report["max_abs_lora_B"] == 0.0 and report["min_max_abs_lora_A"] > 0.0
    # Step 0 equals the unpartitioned model (bf16 trainable heads vs fp32: a loose relative tolerance).
    assert report["losses"][0] == pytest.approx(report["reference_loss"], rel=2e-2)
    # The token rows received gradients and moved; training stays finite.
    assert report["token_rows_change"] > 0.0
    assert all(v == v and abs(v) < 1e6 for v in report["losses"])
    # predict.py reads the ZeRO-3 checkpoint directory: every trainable tensor, equal to the fp32 masters
    assert report["checkpoint_keys_match"] and report["checkpoint_max_abs_diff"] == 0.0
