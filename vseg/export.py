"""`vseg export ckpt=RUN_DIR out=DIR format=official|native|adapter`: a trained run as a standalone model folder.

The run's model is loaded by the loader `predict.py`'s `Predictor` uses (`ModelSource.build`), but kept as training left it: LoRA unmerged and the trained parameters
marked trainable and in the dtype they trained in (the adapter format needs both; the merge below is done
once, in the base's own dtype). `ckpt` is a run directory (its final weights, else its newest complete
checkpoint), a Lightning `.ckpt` or a DeepSpeed checkpoint directory. Then:

* `native`   — LoRA and the trained token rows folded into the base (PEFT `merge_and_unload`), written in
  vseg's own key layout: safetensors shards + index, `config.json` (`vseg_format: native` + the model
  config), tokenizer files. `model.path=DIR` loads it back bit-exactly (same dtype).
* `official` — the same merged weights under the released Sa2VA key names with the authors'
  `Sa2VAChatConfig` config.json (see `vseg.artifacts.folders.write.write_official_folder`); `model.path` loads it too.
* `adapter`  — small: the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`), the trained
  non-LoRA modules (`vseg_modules.safetensors`: projector, mask decoder, text_hidden_fcs), the run config and
  the tokenizer. `vseg.artifacts.adapters` writes and loads it.

The folder is written to a temporary sibling and renamed into place; a non-empty `out` is refused unless
`overwrite=true`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

from vseg.artifacts.adapters import merge_adapters, write_adapter_folder
from vseg.artifacts.folders import (
    folder_architecture,
    merge_architecture,
    read_folder,
    write_native_folder,
    write_official_folder,
)
from vseg.artifacts.runs import config_near
from vseg.artifacts.sources import trained_source
from vseg.config import ConfigError, ModelConfig, compose
from vseg.model.build import DTYPES
from vseg.model.sa2va import Sa2VA

log = logging.getLogger(__name__)

FORMATS = ("official", "native", "adapter")


def effective_model_config(cfg: ModelConfig, model: Sa2VA) -> ModelConfig:
    """The architecture the model was built with: the preset, completed from `model.path`'s config.json."""
    if cfg.path is not None:
        folder = read_folder(cfg.path)
        arch = folder_architecture(folder)
        arch.get("text", {}).pop("vocab_size", None)
        cfg = merge_architecture(cfg, folder, arch)
    rows = int(model.family.input_embeddings(model.base_mllm).weight.shape[0])
    return dataclasses.replace(cfg, text={**cfg.text, "vocab_size": rows})


def _staging(out: Path, run_dir: Path, overwrite: bool) -> Path:
    if out == run_dir or run_dir in out.parents:
        raise ConfigError(f"out={out} is inside the run directory {run_dir}; export somewhere else")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out={out} is not empty; pass overwrite=true or another out=")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def run(pcfg: DictConfig) -> Path:
    """Exports the run `pcfg.ckpt` to `pcfg.out` in `pcfg.format`; returns the folder."""

    if pcfg.format not in FORMATS:
        raise ConfigError(f"format={pcfg.format!r}: expected one of {FORMATS}")
    source = trained_source(pcfg.ckpt)  # configs only: a wrong ckpt fails before anything is built
    assert source.path is not None and source.train_cfg is not None
    run_dir = source.path if source.form == "run" else config_near(source.path).parent
    out = Path(pcfg.out).expanduser().resolve()
    if pcfg.dtype is not None and pcfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={pcfg.dtype!r}: expected one of {sorted(DTYPES)} or null (the run's model.dtype)")
    max_shard_bytes = int(float(pcfg.max_shard_size_mb) * 1024 * 1024)
    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_size_mb={pcfg.max_shard_size_mb}: must be > 0")
    tmp = _staging(out, run_dir, bool(pcfg.overwrite))
    try:
        cfg = source.train_cfg
        model, tokenizer = source.build("cpu", frozen=False)
        model.eval()
        dtype = pcfg.dtype or cfg.model.dtype
        if pcfg.format == "adapter":
            write_adapter_folder(model, cfg, tokenizer, tmp)
        else:
            model_cfg = effective_model_config(cfg.model, model)
            merge_adapters(model)
            if pcfg.format == "native":
                write_native_folder(model, model_cfg, tokenizer, tmp, dtype, max_shard_bytes)
            else:
                base = read_folder(cfg.model.path) if cfg.model.path else None
                write_official_folder(model, model_cfg, tokenizer, tmp, dtype, max_shard_bytes, base=base)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s) to %s", source.describe(), pcfg.format, out)
    print(f"{pcfg.format} export of {source.path} written to {out}", flush=True)
    return out


def main(overrides: list[str]) -> int:
    """`vseg export ...`: compose conf/export.yaml with the overrides and export."""
    run(compose("export", overrides))
    return 0
