"""Memory planner (issue 6): estimates on the meta device, `vseg plan`, strategy=auto, global batch split,
calibration against measured peaks, and the OOM guard (an OOM injected inside a step of a real train.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from vseg.config import ConfigError
from vseg.model.build import count_parameters
from vseg.planner import calibration
from vseg.planner.facts import model_facts, sequence_facts
from vseg.planner.gpus import parse_memory
from vseg.planner.guard import OOM_EXIT_CODE, OutOfMemoryStop, exit_on_oom, oom_guard
from vseg.planner.memory import GB, PLANNED, Setting, estimate
from vseg.planner.plan import (
    SATURATING_MICRO,
    SPEED_ORDER,
    load_for_planning,
    make_plan,
    render,
    split_global_batch,
)
from vseg.planner.startup import prepare_run, resolve_auto

from conftest import ROOT, tiny_cfg


@pytest.fixture(scope="module")
def real_8b():
    """Sa2VA-8B on 4 GPUs at 512 px, micro-batch 8: config, facts and sequence (one meta build)."""
    cfg = load_for_planning(["model=sa2va_8b", "trainer.devices=4", "data.image_size=512", "data.batch_size=8"])
    facts, model, tokenizer = model_facts(cfg)
    counts = count_parameters(model)
    return cfg, facts, sequence_facts(cfg, model, tokenizer), counts


def test_parse_memory():
    assert parse_memory("24GB") == parse_memory("24G") == parse_memory("24GiB") == parse_memory("24") == 24 * GB
    assert parse_memory("40960MB") == 40 * GB
    with pytest.raises(ConfigError, match="gpu_memory"):
        parse_memory("lots")


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("global_batch", [1, 7, 12, 32, 64])
def test_global_batch_splits_for_any_device_count(world, global_batch):
    micro, accumulate, effective = split_global_batch(global_batch, world, max_micro=4)
    assert 1 <= micro <= 4 and accumulate >= 1
    assert effective == micro * accumulate * world
    if global_batch % world == 0:
        assert effective == global_batch
    else:  # nearest per-device share: off by less than one sample per device
        assert abs(effective - global_batch) < world


def test_global_batch_size_sets_micro_batch_and_accumulation():
    cfg = prepare_run(tiny_cfg(["data.global_batch_size=12", "data.batch_size=4"]))
    assert (cfg.data.batch_size, cfg.trainer["accumulate_grad_batches"]) == (4, 3)
    cfg = prepare_run(tiny_cfg(["data.global_batch_size=10", "data.batch_size=4"]))
    assert (cfg.data.batch_size, cfg.trainer["accumulate_grad_batches"]) == (2, 5)


def test_tiny_estimate_on_meta():
    cfg = tiny_cfg()
    facts, model, tokenizer = model_facts(cfg)
    counts = count_parameters(model)
    assert (facts.trainable_params, facts.frozen_params) == (counts.trainable, counts.frozen)
    assert facts.llm_layers == 2 and facts.hidden == 64 and len(facts.lora_sites) == 7
    seq = sequence_facts(cfg, model, tokenizer)
    assert seq.image_tokens == 4 and seq.tiles == 1 and seq.text_tokens > 10  # 56-px tile -> 4 tokens
    one = estimate(facts, seq, Setting("single", 1, 1, precision="32-true", grad_ckpt=False))
    four = estimate(facts, seq, Setting("single", 1, 4, precision="32-true", grad_ckpt=False))
    assert one.frozen == facts.frozen_bytes and one.optimizer == 8 * facts.trainable_params
    assert four.activations == pytest.approx(4 * one.activations)  # activations scale with the micro-batch
    assert four.allocated > one.allocated > one.frozen


def test_real_size_8b_facts_and_strategies(real_8b):
    cfg, facts, seq, counts = real_8b
    assert (facts.trainable_params, facts.frozen_params) == (counts.trainable, counts.frozen)
    assert facts.hidden == 4096 and facts.llm_layers == 32 and facts.kv_dim == 1024
    assert "embed_tokens" in facts.largest_layer[0] and facts.largest_layer[1] == 92558 * 4096
    assert seq.image_tokens == 256 and seq.tiles == 1  # 512 px -> one 448 tile, 256 tokens
    est = {s: estimate(facts, seq, Setting(s, 4, 8)) for s in PLANNED}
    assert est["ddp"].frozen == est["zero2"].frozen == facts.frozen_bytes  # bf16 weights already
    assert est["zero3"].frozen == pytest.approx(est["zero2"].frozen / 4)
    assert est["zero2_offload"].optimizer == 0 and est["zero2_offload"].host == pytest.approx(
        16 * facts.trainable_params
    )
    assert est["zero3_offload"].frozen == 0 and est["zero3_offload"].host > facts.frozen_bytes
    totals = [est[s].total for s in ("ddp", "zero2", "zero2_offload", "zero3", "zero3_offload")]
    assert totals == sorted(totals, reverse=True)  # each step down the list saves memory
    # Gradient checkpointing: far fewer LLM activations.
    no_ckpt = estimate(facts, seq, Setting("zero2", 4, 8, grad_ckpt=False))
    assert no_ckpt.detail["act_llm"] > 8 * est["zero2"].detail["act_llm"]


def test_plan_answers_does_8b_fit_4x24gb(real_8b):
    cfg, facts, seq, _ = real_8b
    plan = make_plan(cfg, 4, parse_memory("24GB"), facts=(facts, seq))
    assert [r.strategy for r in plan.rows] == list(SPEED_ORDER)
    rec = plan.recommended
    assert rec is not None and rec.best is not None and rec.best.total <= 24 * GB
    assert rec.best.setting.effective_batch == 32  # 4 GPUs x 8 kept
    # Nothing faster fits at a micro-batch that keeps the GPU busy (SATURATING_MICRO), and this one does.
    enough = min(SATURATING_MICRO, plan.share)
    assert rec.best.setting.micro_batch >= enough
    for row in plan.rows[: SPEED_ORDER.index(rec.strategy)]:
        assert row.status in ("no", "n/a") or row.best.setting.micro_batch < enough
    text = render(plan)
    assert len(text.splitlines()) <= 24 and max(len(line) for line in text.splitlines()) <= 150
    assert f"strategy={rec.strategy}" in text and "answer: yes" in text
    for word in ("frozen", "train", "grads", "optim", "activ", "buffer", "host"):
        assert word in text


@pytest.mark.parametrize("gb", [12, 24, 40, 80])
def test_strategy_auto_picks_as_the_plan_says(real_8b, gb):
    cfg, facts, seq, _ = real_8b
    capacity = gb * GB
    plan = make_plan(cfg, 4, capacity, facts=(facts, seq))
    if plan.recommended is None:
        with pytest.raises(ConfigError, match="nothing fits"):
            resolve_auto(cfg, 4, capacity, plan=plan)
        return
    chosen, why = resolve_auto(cfg, 4, capacity, plan=plan)
    best = plan.recommended.best
    assert chosen.strategy.name == plan.recommended.strategy and chosen.strategy.name in why
    assert (chosen.data.batch_size, chosen.trainer["accumulate_grad_batches"]) == (
        best.setting.micro_batch,
        best.setting.accumulate,
    )
    if gb == 80:
        assert chosen.strategy.name == "ddp"  # plenty of memory: the fastest


def test_more_memory_never_picks_a_slower_strategy(real_8b):
    cfg, facts, seq, _ = real_8b
    picks = []
    for gb in (16, 20, 24, 32, 48, 80):
        rec = make_plan(cfg, 4, gb * GB, facts=(facts, seq)).recommended
        picks.append(SPEED_ORDER.index(rec.strategy) if rec else len(SPEED_ORDER))
    assert picks == sorted(picks, reverse=True)


def test_strategy_auto_without_cuda_runs_on_the_cpu():
    cfg = prepare_run(tiny_cfg(["strategy=auto"]))
    assert cfg.strategy.name == "single"
    cfg = prepare_run(tiny_cfg(["strategy=auto", "trainer.devices=2", "trainer.accelerator=cpu"]))
    assert cfg.strategy.name == "ddp"


def test_vseg_plan_command(capsys):
    from vseg.cli import COMMANDS, main

    assert COMMANDS["plan"][0] == "vseg.planner.plan"
    assert main(["plan", "model=tiny", "trainer.devices=2", "gpu_memory=8GB", "data.batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "tiny on 2 x 8.0 GB GPUs" in out and "answer: yes" in out
    assert all(s in out for s in PLANNED)


def test_calibration_table_format():
    assert calibration.tolerance() == 0.15
    for row in calibration.measured_rows():
        assert row["model"] and row["strategy"] and row["source"]


def test_calibration_estimates_within_15_percent_of_measured_peaks():
    rows = calibration.measured_rows()
    if not rows:
        pytest.skip("no measured training peaks yet (calibration.json and bench/results/train_*.json are empty)")
    tol = calibration.tolerance()
    compared = [c for row in rows for c in calibration.compare(row) if c.what in calibration.CHECKED]
    assert len(compared) >= len(rows)  # every measured row has a checked peak
    bad = [str(c) for c in compared if abs(c.error) > tol]
    assert not bad, "estimates outside +-15 %:\n" + "\n".join(bad)


def test_startup_gpu_report_lists_the_gpus_and_warns_when_the_estimate_exceeds_free_memory(monkeypatch, capsys):
    """The one-screen report training prints on GPUs, from a faked inventory (name, total, free per GPU)."""
    from vseg.planner import startup
    from vseg.planner.gpus import GpuInfo

    gpus = [
        GpuInfo(0, "NVIDIA H200", 141 * GB, 120 * GB),
        GpuInfo(1, "NVIDIA H200", 141 * GB, 0.25 * GB),  # nearly full: less than the tiny run needs
        GpuInfo(2, "NVIDIA H200", 141 * GB, 140 * GB),  # not used by this run
    ]
    monkeypatch.setattr(startup, "gpu_inventory", lambda: gpus)
    cfg = tiny_cfg(["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
    cfg = replace(cfg, trainer={**cfg.trainer, "accelerator": "gpu"})  # as if CUDA were there
    prepare_run(cfg)
    out = capsys.readouterr().out
    assert "GPUs: 3 visible, this run uses 2 per node" in out
    assert " * 0  NVIDIA H200" in out and " * 1  NVIDIA H200" in out and "   2  NVIDIA H200" in out
    assert "total  141.0 GB  free  120.0 GB" in out
    assert "plan: strategy=ddp, micro-batch 2 x accumulation 1 x 2 process(es) = 4: est." in out
    warning = out.split("WARNING: ", 1)[1]
    assert "exceeds the free memory of GPU 1 (0.2 GB)" in warning and "GPU 0" not in warning


# ---------------------------------------------------------------------------------------------- OOM guard
def test_oom_inside_a_training_step_ends_with_advice_and_a_clean_exit(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, VSEG_TEST_OOM_AT="train:1")  # test-only hook (vseg/planner/guard.py)
    args = [
        f"run_dir={run_dir}",
        "data.num_samples=8",
        "trainer.max_steps=4",
        "checkpoint.every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0",
        "trainer.val_check_interval=null",
        "trainer.check_val_every_n_epoch=100",
        "plan.gpu_memory=24GB",
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == OOM_EXIT_CODE, proc.stderr[-3000:]
    err = proc.stderr
    assert "Traceback" not in err
    assert "out of GPU memory during training at step 1 (rank 0)" in err
    assert "the GPU has 24.0 GB" in err and "est." in err and "GB/GPU" in err
    assert "1. " in err and "last good checkpoint is untouched" in err
    # The checkpoint written before the failure is complete and nothing was written after it.
    from vseg.artifacts.checkpoints import checkpoint_step, complete_checkpoints

    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step0000001.ckpt"], names
    assert [s for s, _ in complete_checkpoints(run_dir / "checkpoints")] == [1]
    assert checkpoint_step(run_dir / "checkpoints" / "step0000001.ckpt") == 1


@pytest.mark.slow  # a short in-process training run up to its first validation
def test_oom_in_validation_names_the_phase(tmp_path, monkeypatch, capsys):
    from vseg.training.run import run

    monkeypatch.setenv("VSEG_TEST_OOM_AT", "val:2")
    cfg = tiny_cfg([f"run_dir={tmp_path}", "trainer.max_steps=4", "plan.gpu_memory=16GB"])
    with pytest.raises(SystemExit) as exit_info, exit_on_oom():
        run(cfg)
    assert exit_info.value.code == OOM_EXIT_CODE
    err = capsys.readouterr().err
    assert "out of GPU memory during validation at step 2" in err and "the GPU has 16.0 GB" in err


def test_oom_guard_for_prediction_gives_smaller_batches(capsys):
    cfg = tiny_cfg()
    with pytest.raises(OutOfMemoryStop) as info, oom_guard("prediction", cfg=cfg, batch_size=8, step=lambda: 3):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    text = str(info.value)
    assert "during prediction at step 3" in text and "batch_size=4: est." in text and "batch_size=2: est." in text
    with pytest.raises(SystemExit) as exit_info, exit_on_oom():
        raise info.value
    assert exit_info.value.code == OOM_EXIT_CODE and "batch_size=4" in capsys.readouterr().err


def test_other_errors_pass_through_the_guards():
    with pytest.raises(ValueError), exit_on_oom():
        raise ValueError("not memory")
    with pytest.raises(RuntimeError, match="shape"), oom_guard("prediction"):
        raise RuntimeError("shape mismatch")


def test_with_setting_keeps_the_rest(real_8b):
    from vseg.planner.plan import with_setting

    cfg = real_8b[0]
    out = with_setting(cfg, "zero3", 2, 4)
    assert out.strategy.stage == 3 and out.data.batch_size == 2 and out.trainer["accumulate_grad_batches"] == 4
    assert out.model == cfg.model and replace(out.data, batch_size=cfg.data.batch_size) == cfg.data
