"""Strategy choices -> Lightning strategies and DeepSpeed configs; DeepSpeed checkpoints -> trainable weights;
LoRA re-initialisation; the users' recipe; the monitor's FLOP bookkeeping. CPU only."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from omegaconf import OmegaConf

from vseg.config import StrategyConfig
from vseg.strategy import ComputeStreamDDP, build_strategy, deepspeed_config
from vseg.training.monitor import flops_of, peak_tflops
from vseg.training.zero3 import lora_init_report, lora_pairs, reinit_lora

from conftest import CONF, ROOT, compose_cfg


def strategy_cfg(name: str) -> StrategyConfig:
    raw = OmegaConf.merge(OmegaConf.structured(StrategyConfig), OmegaConf.load(CONF / "strategy" / f"{name}.yaml"))
    return OmegaConf.to_object(raw)  # type: ignore[return-value]


@pytest.mark.parametrize(
    "name, stage, offload_opt, offload_params",
    [
        ("zero2", 2, False, False),
        ("zero2_offload", 2, True, False),
        ("zero3", 3, False, False),
        ("zero3_offload", 3, True, True),
    ],
)
def test_deepspeed_choices_build_the_right_config(name, stage, offload_opt, offload_params):
    cfg = strategy_cfg(name)
    strategy = build_strategy(cfg, micro_batch=3)
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.exclude_frozen_parameters  # checkpoints hold only what trains
    ds = strategy.config
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and ds["train_micro_batch_size_per_gpu"] == 3
    assert ("offload_optimizer" in zero) == offload_opt and ("offload_param" in zero) == offload_params
    if offload_opt:
        assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    # small buckets: overlap_comm keeps ~4.5x the bucket size in buffers on every GPU
    assert zero["reduce_bucket_size"] <= 5e7
    assert "gradient_accumulation_steps" not in ds  # Lightning fills it from trainer.accumulate_grad_batches


def test_single_and_ddp():
    assert build_strategy(strategy_cfg("single")) == "auto"
    ddp = build_strategy(strategy_cfg("ddp"))
    assert isinstance(ddp, ComputeStreamDDP) and isinstance(ddp, DDPStrategy)
    assert ddp._ddp_kwargs["gradient_as_bucket_view"] is True
    assert deepspeed_config(strategy_cfg("zero2"))["zero_optimization"]["stage"] == 2


def test_users_recipe_composes():
    c = compose_cfg(["+experiment=vessel_4gpu", "model=sa2va_8b", "data=synthetic"])
    assert c.strategy.name == "zero2_offload" and c.trainer.devices == 4
    assert c.trainer.accumulate_grad_batches == 2 and c.data.batch_size == 1 and c.data.repeats == 5
    assert c.trainer.max_epochs == 10 and c.trainer.max_steps == -1 and c.optim.lr == 1e-4
    assert c.trainer.precision == "bf16-mixed" and c.model.name == "sa2va_8b"
    assert c.checkpoint.every_n_steps == 500 and c.checkpoint.keep == 3


def test_reinit_lora_zeroes_b_and_draws_a(built):
    model, _, _ = built
    pairs = list(lora_pairs(model))
    assert pairs
    with torch.no_grad():
        for _, a, b in pairs:
            a.zero_()
            b.fill_(1.0)  # what PEFT's init leaves when it wrote into empty ZeRO-3 shards: not zero
    assert lora_init_report(model)["max_abs_lora_B"] == 1.0
    assert reinit_lora(model) == len(pairs)
    report = lora_init_report(model)
    assert report["max_abs_lora_B"] == 0.0 and report["min_max_abs_lora_A"] > 0.0


def test_monitor_flops_bookkeeping():
    counts = {
        "Global": {"mm": 10},
        "Sa2VA.mllm.x.language_model.layers.0": {"mm": 3},
        "Sa2VA.mllm.x.language_model.layers.0.mlp": {"mm": 2},
        "Sa2VA.grounding": {"mm": 5},
    }
    assert flops_of(counts, {"model.mllm.x.language_model.layers.0"}) == 3.0
    assert peak_tflops("NVIDIA H200") == 989.4 and peak_tflops("NVIDIA GeForce RTX 3090") == 71.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("mystery") is None


def test_monitor_reports_the_share_of_each_window_spent_waiting_for_inputs(monkeypatch, caplog):
    """Windows of 1 s whose batches waited 0.1 s and then 0.5 s: shares 0.1 and 0.5 in the summary, and the
    loader-bound window said once on the console."""
    from types import SimpleNamespace

    import vseg.training.monitor as monitor

    clock = iter([10.0, 11.0, 11.0, 12.0, 12.0, 13.0, 13.0])
    monkeypatch.setattr(monitor, "time", SimpleNamespace(perf_counter=lambda: next(clock)))  # the monitor's clock
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("meta")),  # an accelerator, not CPU (CPU runs: no warning)
        global_step=0,
        log_every_n_steps=1,
        world_size=1,
        is_global_zero=True,
        logger=None,
        num_devices=1,
        datamodule=SimpleNamespace(cfg=SimpleNamespace(num_workers=3)),
    )
    perf = monitor.PerfMonitor(warmup_steps=0)
    caplog.set_level("WARNING", logger="vseg.training.monitor")
    for step, wait in enumerate((0.1, 0.5, 0.6), start=1):
        batch = {"ids": ["a", "b"], "num_tokens": 8, "input_wait_s": wait}
        perf.on_train_batch_start(trainer, None, batch, step - 1)
        trainer.global_step = step
        perf.on_train_batch_end(trainer, None, None, batch, step - 1)
    summary = perf.summary(trainer)
    assert summary["window_input_wait_share"] == [0.1, 0.5, 0.6]
    assert summary["input_wait_share"] == pytest.approx(0.5) and summary["window_samples_per_s"] == [2.0] * 3
    warned = [r.getMessage() for r in caplog.records if "waited for their inputs" in r.getMessage()]
    assert len(warned) == 1 and "steps 2-2" in warned[0] and "50%" in warned[0] and "(now 3)" in warned[0]
    caplog.clear()  # a CPU run: loader and model share the cores, so the share is logged but not warned about
    trainer.strategy.root_device, trainer.global_step = torch.device("cpu"), 0
    clock = iter([20.0, 21.0, 21.0])
    cpu = monitor.PerfMonitor(warmup_steps=0)
    cpu.on_train_batch_start(trainer, None, batch, 0)
    trainer.global_step = 1
    cpu.on_train_batch_end(trainer, None, None, batch, 0)
    assert cpu.summary(trainer)["window_input_wait_share"] == [0.6]
    assert not [r for r in caplog.records if "waited for their inputs" in r.getMessage()]


DS_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from vseg.artifacts.deepspeed import trainable_weights_from_checkpoint
    for stage in (2, 3):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 5), torch.nn.Linear(5, 3))
        model[0].requires_grad_(False)  # frozen: excluded from the checkpoint
        holder = torch.nn.Module(); holder.model = model  # keys like the LightningModule's: model.<name>
        opt = torch.optim.AdamW([p for p in holder.parameters() if p.requires_grad], lr=1e-2)
        config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=holder, optimizer=opt, config=config)
        for _ in range(2):
            loss = engine.module.model(torch.randn(2, 8).bfloat16()).float().pow(2).sum()
            engine.backward(loss)
            engine.step()
        path = os.path.join(sys.argv[1], f"stage{stage}.ckpt")
        engine.save_checkpoint(path, tag="checkpoint", exclude_frozen_parameters=True)
        want = {n.removeprefix("model."): safe_get_full_fp32_param(p) for n, p in holder.named_parameters()
                if p.requires_grad}
        got = trainable_weights_from_checkpoint(path)
        assert set(got) == set(want) == {"1.weight", "1.bias", "2.weight", "2.bias"}, (sorted(got), sorted(want))
        for k in want:
            assert torch.equal(got[k], want[k].float()), k
            assert got[k].dtype == torch.float32
        print("stage", stage, "ok")
    """
)


@pytest.mark.slow
def test_deepspeed_checkpoint_directory_converts_to_fp32_trainable_weights(tmp_path):
    script = tmp_path / "ds.py"
    script.write_text(DS_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "29611"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "stage 2 ok" in proc.stdout and "stage 3 ok" in proc.stdout
