"""Every file vseg reads or writes, in one layer between training / inference and the model.

- `files`     atomic writes, one file mode, storage errors (full disk, read-only)
- `loading`   the one safe `torch.load` (weights_only, a restricted unpickler for metadata) and safetensors checks
- `folders`   Hugging Face-style folders: read, load into vseg's model, write (native / official); the released
              key layouts and config conversion they use belong to the model families (`vseg.model.families`)
- `runs`      run directories: their config, their trained weights, their checkpoints
- `sources`   what a `ckpt=` names and how to rebuild its model
- `adapters`  PEFT adapter exports and merging adapters into the base

`build_sa2va` is the one way to get a model: random weights at the config's sizes, or a folder's weights.
"""

from __future__ import annotations

from vseg.artifacts.folders import load_sa2va
from vseg.config import LoraConfig, ModelConfig
from vseg.model.build import finish_build, new_sa2va


def build_sa2va(cfg: ModelConfig, lora: LoraConfig | None = None):
    """Sa2VA with random weights at the sizes in `cfg`, or with `cfg.path`'s weights, set up for `lora`.

    Args:
        cfg: architecture and dtype (a folder's own architecture is checked against it).
        lora: what trains; None builds a fully frozen model (inference).

    Returns:
        (model, tokenizer): frozen parts in `cfg.dtype`, trainable parts in float32.
    """
    if cfg.path is not None:
        # Architecture from the folder's config.json (checked against the preset), weights loaded shard by
        # shard into a meta-built model.
        model, tokenizer, cfg = load_sa2va(cfg)
    else:
        model, tokenizer = new_sa2va(cfg)
    finish_build(model, tokenizer, cfg, lora)
    return model, tokenizer


__all__ = ["build_sa2va"]
