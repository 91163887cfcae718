"""PEFT adapter exports (`vseg export format=adapter`) and folding adapters into the base weights.

An adapter folder is small: PEFT's `adapter_config.json` + `adapter_model.safetensors`, the trained non-LoRA
modules (`vseg_modules.safetensors`: projector, mask decoder, text_hidden_fcs), the run config (in
`config.json`, with `vseg_format: adapter`) and the tokenizer. Loading rebuilds the base exactly as training
built it (seeded random init, or its `model.path`) and applies them.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from peft import set_peft_model_state_dict

from vseg.artifacts import build_sa2va
from vseg.artifacts.files import save_safetensors
from vseg.artifacts.folders import write_json
from vseg.artifacts.loading import load_safetensors
from vseg.artifacts.runs import load_train_config
from vseg.config import ConfigError, TrainConfig
from vseg.model.build import read_in
from vseg.model.sa2va import Sa2VA

ADAPTER_FORMAT = "adapter"
MODULES_FILE = "vseg_modules.safetensors"


def merge_adapters(model: Sa2VA) -> Sa2VA:
    """Folds LoRA and the trainable token rows into the base weights, in place; leaves a plain model."""
    if hasattr(model.mllm, "merge_and_unload"):
        model.mllm = model.mllm.merge_and_unload()
    leftover = [n for n, _ in model.named_parameters() if "lora_" in n or "trainable_tokens_" in n]
    if leftover:
        raise RuntimeError(f"adapters left after merge_and_unload: {leftover[:5]}")
    return model


def _adapter_modules(model: Sa2VA) -> dict[str, torch.Tensor]:
    """Trained parameters that PEFT's adapter file does not hold (projector, mask decoder, text_hidden_fcs)."""
    return {
        n: p.detach().cpu().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad and "lora_" not in n and "trainable_tokens_" not in n
    }


def write_adapter_folder(model: Sa2VA, cfg: TrainConfig, tokenizer, folder: Path) -> None:
    """PEFT adapter + the other trained modules + the run config: rebuild the base, apply, done."""
    if not hasattr(model.mllm, "peft_config"):
        raise ConfigError("format=adapter: this run has no PEFT adapter (lora.enabled=false, no token rows)")
    model.mllm.save_pretrained(str(folder))
    save_safetensors(_adapter_modules(model), folder / MODULES_FILE, metadata={"format": "pt"})
    train = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    write_json(folder / "config.json", {"vseg_format": ADAPTER_FORMAT, "train": train})
    tokenizer.save_pretrained(str(folder))


def load_adapter_folder(path: str | Path, dtype: str | None = None) -> tuple[TrainConfig, Sa2VA, object]:
    """Rebuilds the base of an `adapter` export (seeded random init or its `model.path`, read in `dtype` when
    given: `read_in`) and applies it."""
    folder = Path(path)
    config_file = folder / "config.json"
    data = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if data.get("vseg_format") != ADAPTER_FORMAT:
        raise ConfigError(f"{folder}: not a `vseg export format=adapter` folder (config.json says otherwise)")
    cfg = load_train_config(data["train"], "adapter export")
    L.seed_everything(cfg.seed, verbose=False)
    model, tokenizer = build_sa2va(read_in(cfg.model, dtype), cfg.lora)
    fix = "export the run again (`vseg export format=adapter ckpt=RUN out=...`)"
    result = set_peft_model_state_dict(model.mllm, load_safetensors(folder / "adapter_model.safetensors", fix))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    modules = load_safetensors(folder / MODULES_FILE, fix)
    expected = set(_adapter_modules(model))
    if set(modules) != expected or unexpected:
        raise ConfigError(
            f"{folder}: adapter does not fit the model of its config (missing {sorted(expected - set(modules))[:5]}, "
            f"unexpected {sorted(set(modules) - expected)[:5] + unexpected[:5]})"
        )
    model.load_state_dict(modules, strict=False)
    return cfg, model, tokenizer
