"""Trained weights out of checkpoints: Lightning `.ckpt` files and DeepSpeed ZeRO-1/2/3 directories.

`vseg weights ckpt=RUN/checkpoints/<checkpoint>` writes `RUN/weights/trainable.safetensors` from either form,
so `predict.py ckpt=RUN` and `vseg export ckpt=RUN` work on a run that was stopped before it finished. A
DeepSpeed directory holds the fp32 trainable weights in its optimizer partitions (one file per rank); they
are put back together here without DeepSpeed's engine, so one CPU process reads what N GPUs wrote.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from vseg.artifacts.files import atomic_write, save_safetensors
from vseg.artifacts.loading import load_torch_file
from vseg.artifacts.runs import CONFIG_FILE, WEIGHTS_FILE, load_train_config
from vseg.config import ConfigError
from vseg.model.sizes import build_on_meta

# ---------------------------------------------------------------------------------- DeepSpeed checkpoints
_OPTIM_FILE = re.compile(r"^(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


LIGHTNING_PREFIXES = ("_forward_module.", "module.")


def is_deepspeed_checkpoint(path: Path) -> bool:
    """A directory written by Lightning's DeepSpeedStrategy (`<path>/checkpoint/*model_states.pt`)."""
    return Path(path).is_dir() and any((Path(path) / "checkpoint").glob("*model_states.pt"))


def _safe_load(path: Path) -> Any:
    """The safe load (weights_only), allowing only the DeepSpeed classes its checkpoints pickle."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return load_torch_file(path, allow=[LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])


def _strip(name: str) -> str:
    for prefix in LIGHTNING_PREFIXES:
        name = name.removeprefix(prefix)
    return name


def deepspeed_trainable_weights(path: str | Path, tag: str = "checkpoint") -> dict[str, torch.Tensor]:
    """fp32 trainable weights of a DeepSpeed ZeRO-1/2/3 checkpoint directory, keyed like the LightningModule.

    Reassembles each rank's flat fp32 partition (as DeepSpeed's zero_to_fp32 does) for exactly the
    parameters the checkpoint recorded as optimised; frozen parameters are not in the checkpoint.
    `tag`: the sub-directory holding the state files (Lightning writes `checkpoint`).

    Raises:
        ConfigError: the directory is not a complete DeepSpeed checkpoint.
    """
    tag_dir = Path(path) / tag
    optim = sorted((int(m.group(1)), f) for f in tag_dir.glob("*optim_states.pt") if (m := _OPTIM_FILE.match(f.name)))
    model_files = sorted(tag_dir.glob("*model_states.pt"))
    if not optim or not model_files:
        raise ConfigError(f"{path}: no DeepSpeed optimizer/model state files under {tag_dir}")
    world = len(optim)
    if [r for r, _ in optim] != list(range(world)):
        raise ConfigError(f"{path}: optimizer state files of ranks {[r for r, _ in optim]}: some are missing")
    model_state = _safe_load(model_files[0])
    param_shapes = model_state["param_shapes"]  # list (one per param group) of {name: shape}
    if isinstance(param_shapes, dict):
        param_shapes = [param_shapes]
    states = [_safe_load(f)["optimizer_state_dict"] for _, f in optim]
    stage = int(states[0]["zero_stage"])
    out: dict[str, torch.Tensor] = {}
    if stage <= 2:
        key = "single_partition_of_fp32_groups"
        for group, shapes in enumerate(param_shapes):
            flat = torch.cat([s[key][group].float() for s in states])
            offset = 0
            for name, shape in shapes.items():
                numel = math.prod(shape)
                out[_strip(name)] = flat[offset : offset + numel].view(shape).clone()
                offset += numel
            if offset > flat.numel():
                raise ConfigError(f"{path}: group {group} holds {flat.numel()} values, shapes need {offset}")
    else:
        key = "fp32_flat_groups"
        flats = [torch.cat([g.float().flatten() for g in s[key]]) for s in states]
        offset = 0
        for shapes in param_shapes:
            for name, shape in shapes.items():
                numel = math.prod(shape)
                part = math.ceil(numel / world)
                pieces = [f[offset : offset + part] for f in flats]
                out[_strip(name)] = torch.cat(pieces)[:numel].view(shape).clone()
                offset += part
    return out


def trainable_weights_from_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Trainable weights of any vseg checkpoint (a Lightning `.ckpt` file or a DeepSpeed directory), keyed by
    Sa2VA parameter names (the `model.` of the LightningModule removed), fp32."""
    path = Path(path)
    if is_deepspeed_checkpoint(path):
        state = deepspeed_trainable_weights(path)
    elif path.is_file():
        ckpt = load_torch_file(path)  # UNSAFE pickles, truncated or foreign files: one CheckpointError
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise ConfigError(f"ckpt={path}: holds no `state_dict`; not a Lightning checkpoint written by vseg")
        state = ckpt["state_dict"]
    else:
        raise ConfigError(f"ckpt={path}: neither a checkpoint file nor a DeepSpeed checkpoint directory")
    if not state:
        raise ConfigError(f"ckpt={path}: holds no weights")
    return {k.removeprefix("model."): v.float().contiguous() for k, v in state.items()}


def write_trainable_weights(ckpt: str | Path, run_dir: str | Path | None = None) -> Path:
    """Writes `RUN/weights/trainable.safetensors` from a checkpoint of that run (checked against its config).

    `run_dir` defaults to the checkpoint's run (`RUN/checkpoints/<ckpt>`). The result is what a finished run
    leaves, so `predict.py ckpt=RUN` and `vseg export ckpt=RUN` work on it. The file is replaced atomically.
    """
    ckpt = Path(ckpt).expanduser().resolve()
    run = Path(run_dir).expanduser().resolve() if run_dir else ckpt.parent.parent
    weights = trainable_weights_from_checkpoint(ckpt)  # first: a file that is no checkpoint is the problem to name
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: no config.yaml; pass out=RUN_DIR (the run this checkpoint belongs to)")
    expected = _expected_trainable(run)
    if expected is not None and set(weights) != expected:
        raise ConfigError(
            f"{ckpt} does not match the trainable weights of {run}/config.yaml "
            f"(missing {sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]})"
        )
    target = run / WEIGHTS_FILE
    atomic_write(target, lambda p: save_safetensors(weights, p, {"source": str(ckpt)}), "trained weights")
    return target


def _expected_trainable(run: Path) -> set[str] | None:
    """Trainable parameter names of the run's model, from a meta-device build (None if it cannot be built)."""
    cfg = load_train_config(run / CONFIG_FILE)
    if cfg.model.path is not None:
        return None  # the architecture comes from the folder; predict/export check the keys when loading
    model, _ = build_on_meta(cfg.model, cfg.lora)
    return {n for n, p in model.named_parameters() if p.requires_grad}


def main(overrides: list[str]) -> int:
    """`vseg weights ckpt=CHECKPOINT [out=RUN_DIR]`: a checkpoint (file or DeepSpeed directory) -> trainable.safetensors."""
    args = dict(o.split("=", 1) for o in overrides if "=" in o)
    unknown = set(args) - {"ckpt", "out"} | {o for o in overrides if "=" not in o}
    if "ckpt" not in args or unknown:
        raise ConfigError("usage: vseg weights ckpt=RUN/checkpoints/<checkpoint> [out=RUN_DIR]")
    path = write_trainable_weights(args["ckpt"], args.get("out"))
    print(f"trainable weights written to {path}", flush=True)
    return 0
