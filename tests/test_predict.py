"""predict.py over a finished run: same model, same masks, same scores as the run's own validation."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from vseg.config import ConfigError
from vseg.data.datamodule import VesselDataModule
from vseg.model.build import build_tokenizer
from vseg.model.processor import Sa2VAProcessor
from vseg.predict import run as predict
from vseg.train import run as train

from conftest import CONF, tiny_cfg


def test_predict_reproduces_the_runs_validation(tmp_path):
    run_dir = tmp_path / "run"
    result = train(
        tiny_cfg(
            [
                f"run_dir={run_dir}",
                "trainer.max_steps=4",
                "trainer.val_check_interval=4",
                "optim.lr=1e-2",
                "trainer.log_every_n_steps=1",
            ]
        )
    )
    out = tmp_path / "pred"
    summary = predict(_predict_cfg(ckpt=str(run_dir), out=str(out), batch_size=3))
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert summary["images"] == len(lines) == 1  # 8 samples, val_fraction 0.125
    assert (out / lines[0]["mask"]).is_file()
    assert json.loads((out / "summary.json").read_text())["dice"] == pytest.approx(summary["dice"])
    # The rebuilt model (seeded base + saved weights) scores as the run's last validation did...
    assert summary["dice"] == pytest.approx(result.metrics["val/dice"], abs=1e-6)
    # ...and gives the trained model's own mask logits for the validation image.
    module = result.module
    data = VesselDataModule(module.cfg.data, _processor_like(module))
    data.setup("fit")
    batch = data.val_set.processor.collate([data.val_set[0]])
    with torch.no_grad():
        o = module.model.eval()(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            batch["sam_pixel_values"],
            batch["mllm_inputs"],
        )
    assert lines[0]["id"] == batch["ids"][0]
    assert lines[0]["mean_logit"] == pytest.approx(float(o.mask_logits.mean()), rel=1e-5)
    with pytest.raises(ConfigError, match="not empty"):
        predict(_predict_cfg(ckpt=str(run_dir), out=str(out), batch_size=3))


def _predict_cfg(**values):
    """conf/predict.yaml's defaults (without the hydra block) with `values` set, as predict.py sees them."""
    cfg = OmegaConf.load(CONF / "predict.yaml")
    cfg.pop("hydra")
    cfg.pop("defaults")
    return OmegaConf.merge(cfg, values)


def _processor_like(module):
    model, cfg = module.model, module.cfg
    tokenizer, _ = build_tokenizer(cfg.model)
    return Sa2VAProcessor.for_model(model, tokenizer, cfg.model, cfg.data.max_length)


def test_predict_rejects_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match="config.yaml not found"):
        predict(_predict_cfg(ckpt=str(tmp_path)))
