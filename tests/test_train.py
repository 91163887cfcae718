"""train(cfg) end to end on the tiny model: files, logs, trainable-only checkpoints, resume, round trip."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vseg.artifacts import build_sa2va
from vseg.training.run import run

from conftest import ROOT, tiny_cfg

SCALARS = ["train/loss", "train/loss_mask", "train/loss_dice", "train/llm_loss", "train/lr", "val/dice", "val/iou"]


def test_run_writes_a_self_describing_run_dir(tmp_path):
    cfg = tiny_cfg(
        [
            f"run_dir={tmp_path}",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "checkpoint.every_n_steps=2",
            "checkpoint.keep=1",
            "trainer.log_every_n_steps=1",
        ]
    )
    result = run(cfg)
    assert result.global_step == 4
    assert (tmp_path / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and "step0000004.ckpt" in ckpts and "step0000002.ckpt" not in ckpts  # keep=1
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(SCALARS) <= set(events.Tags()["scalars"])
    assert "val/overlay" in events.Tags()["images"]

    # The checkpoint holds exactly the trainable weights, not the frozen base.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    model, _ = build_sa2va(cfg.model, cfg.lora)
    trainable = {"model." + n for n, p in model.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable
    assert "optimizer_states" in ckpt and ckpt["global_step"] == 4


def test_saved_trainable_weights_round_trip_exactly(tmp_path):
    import lightning as L
    import numpy as np

    from vseg.model.processor import Sa2VAProcessor

    cfg = tiny_cfg([f"run_dir={tmp_path}", "trainer.max_steps=3", "optim.lr=1e-2"])
    run(cfg)
    saved = load_file(tmp_path / "weights" / "trainable.safetensors")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")

    def fresh():
        L.seed_everything(cfg.seed)  # the run seeds like this before building: same frozen base
        model, tokenizer = build_sa2va(cfg.model, cfg.lora)
        return model.eval(), tokenizer

    from_safetensors, tokenizer = fresh()
    result = from_safetensors.load_state_dict(saved, strict=False)
    assert result.unexpected_keys == []
    from_ckpt, _ = fresh()
    from_ckpt.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}, strict=False)
    untrained, _ = fresh()

    processor = Sa2VAProcessor(tokenizer, untrained.family, untrained.base_mllm.config, cfg.model, 128, 32)
    rng = np.random.default_rng(0)
    batch = processor.collate(
        [
            processor.encode(
                rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
                "Segment the vessels.",
                "It is [SEG].",
                rng.random((64, 64)) > 0.5,
            )
        ]
    )
    args = (
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        batch["sam_pixel_values"],
        batch["mllm_inputs"],
    )
    with torch.no_grad():
        a, b, c = (m(*args) for m in (from_safetensors, from_ckpt, untrained))
    assert torch.equal(a.mask_logits, b.mask_logits) and torch.equal(a.llm_loss_sum, b.llm_loss_sum)
    assert not torch.allclose(a.mask_logits, c.mask_logits)  # the saved weights are the trained ones


def test_resume_continues_the_global_step(tmp_path):
    first = tiny_cfg([f"run_dir={tmp_path}", "trainer.max_steps=3", "checkpoint.every_n_steps=3"])
    run(first)
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = torch.load(last, weights_only=True, map_location="cpu")
    resumed = tiny_cfg([f"ckpt_path={last}", "trainer.max_steps=5", "checkpoint.every_n_steps=3"])
    result = run(resumed)
    assert result.run_dir == tmp_path.resolve()  # a resumed run writes into its own directory
    assert result.global_step == 5
    after = torch.load(last, weights_only=True, map_location="cpu")
    assert after["global_step"] == 5
    sched_before = before["lr_schedulers"][0]["last_epoch"]
    assert after["lr_schedulers"][0]["last_epoch"] == sched_before + 2


def test_train_entry_point_end_to_end(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            f"run_dir={tmp_path}",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "data.num_samples=6",
            "trainer.enable_progress_bar=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"tensorboard --logdir {tmp_path}" in proc.stdout
    assert (tmp_path / "weights" / "trainable.safetensors").is_file()
