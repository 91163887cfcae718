"""What `ckpt=` names, and how to rebuild its model.

| form | recognised by | model from |
|---|---|---|
| run directory | `config.yaml` (+ `weights/trainable.safetensors`, else its newest complete checkpoint) | the run's config: seeded base (or its `model.path`) + trained weights |
| Lightning checkpoint | a `.ckpt` file | the run's `config.yaml` (next to `checkpoints/`) + the checkpoint's trainable `state_dict` |
| DeepSpeed checkpoint | a directory with `<tag>/mp_rank_00_model_states.pt` (what Lightning's DeepSpeedStrategy writes, frozen parameters excluded) | the run's `config.yaml` + the module weights saved there (ZeRO-1/2) |
| native / official export | `config.json` with `vseg_format: native` / `model_type: sa2va_chat` | the folder (`model.path`) |
| adapter export | `config.json` with `vseg_format: adapter` | `vseg.artifacts.adapters.load_adapter_folder` |
| released Sa2VA folder | `config.json` `model_type: sa2va_chat` | the folder, zero-shot; `model=<preset>` or the preset whose architecture it matches |
| `random` | the word | random weights of `model=<preset>` (benchmarks, smoke tests) |

Checkpoint files are read with `torch.load(weights_only=True)` or safetensors only. Every weight set is
checked key by key against the model its config builds; a checkpoint of another model (family, size or
adapter setup) is refused with the keys that differ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from vseg.artifacts import build_sa2va
from vseg.artifacts.adapters import load_adapter_folder
from vseg.artifacts.checkpoints import newest_checkpoint
from vseg.artifacts.deepspeed import deepspeed_trainable_weights
from vseg.artifacts.folders import CheckpointError, folder_architecture, merge_architecture, read_folder
from vseg.artifacts.loading import check_safetensors, load_checkpoint, load_safetensors
from vseg.artifacts.runs import WEIGHTS_FIX, apply_trainable, config_near, load_train_config
from vseg.config import ConfigError, ModelConfig, TrainConfig, describe_differences, model_differences
from vseg.model.build import read_in
from vseg.model.random_init import build_random
from vseg.model.sa2va import Sa2VA

log = logging.getLogger(__name__)

CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model"
FORMS = ("run", "lightning", "deepspeed", "native", "official", "adapter", "random")
#: forms that hold a training run: its config, and trained weights to apply to the base it rebuilds
TRAINED_FORMS = ("run", "lightning", "deepspeed")


@dataclass
class ModelSource:
    """A resolved `ckpt=`: its form, paths and the configs needed to build it."""

    form: str
    path: Path | None
    model_cfg: ModelConfig
    train_cfg: TrainConfig | None = None  # run forms: seed, lora, data of the run
    weights_file: Path | None = None  # run/lightning/deepspeed: where the trained weights are

    @property
    def template(self) -> str:
        return self.model_cfg.template

    def describe(self) -> str:
        return f"{self.form}:{self.path}" if self.path else self.form

    def build(
        self, device: torch.device | str = "cpu", dtype: str | None = None, *, frozen: bool = True
    ) -> tuple[Any, Any]:
        """(model, tokenizer) with every weight loaded, on `device` (random: materialised there).

        Args:
            dtype: the dtype inference will run in; weights read from files are read in it (`read_in`).
            frozen: every parameter frozen (inference). False keeps a run's trainable parameters trainable and
                in the dtype they trained in, LoRA unmerged: `vseg export` tells them apart for its adapter format.
        """
        if self.form == "random":
            return build_random(self.model_cfg, {"": str(device)})
        if self.form == "adapter":
            _, model, tokenizer = load_adapter_folder(self.path, dtype)  # type: ignore[arg-type]
        elif self.form in ("native", "official"):
            model, tokenizer = build_sa2va(read_in(self.model_cfg, dtype), None)
        else:
            cfg = self.train_cfg
            assert cfg is not None and self.weights_file is not None
            weights = read_trainable(self.form, self.weights_file)
            L.seed_everything(cfg.seed, verbose=False)  # reproduces a random-init base exactly as training built it
            model, tokenizer = build_sa2va(read_in(cfg.model, dtype), cfg.lora)
            apply_trainable(model, weights, self.weights_file)
        if frozen:
            model.requires_grad_(False)
        return model.to(device), tokenizer


def deepspeed_model_states(directory: Path) -> Path | None:
    """The model-states file of a DeepSpeed checkpoint directory (tag from `latest`), or None.

    ZeRO-1/2 write `mp_rank_00_model_states.pt`; ZeRO-3 one `zero_pp_rank_<r>_mp_rank_00_model_states.pt` per rank.
    """
    tags = []
    latest = directory / "latest"
    if latest.is_file():
        tags.append(latest.read_text().strip())
    tags += sorted(p.name for p in directory.iterdir() if p.is_dir())
    for tag in tags:
        candidate = directory / tag / "mp_rank_00_model_states.pt"
        if candidate.is_file():
            return candidate
        ranked = sorted((directory / tag).glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
        if ranked:
            return ranked[0]
    return None


def read_trainable(form: str, path: Path) -> dict[str, torch.Tensor]:
    """The trainable weights (Sa2VA parameter names) stored at `path` by a run, Lightning or DeepSpeed."""
    if form == "run":
        return load_safetensors(path, WEIGHTS_FIX.format(run=path.parent.parent))
    if form == "lightning":
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise CheckpointError(f"{path}: a .ckpt without a state_dict; not a Lightning checkpoint")
        if "vseg" not in ckpt:
            log.warning("%s was not written by vseg's trainer; trying its state_dict anyway", path)
        return _strip(ckpt["state_dict"], ("model.",))
    if any(path.parent.glob("*optim_states.pt")):
        # The optimizer's fp32 partitions: exact for any ZeRO stage (the module weights are bf16 copies, and
        # empty under ZeRO-3). The same reader as `vseg weights`.
        return {
            k.removeprefix("model."): v
            for k, v in deepspeed_trainable_weights(path.parent.parent, path.parent.name).items()
        }
    states = load_checkpoint(path)
    module = states.get("module") if isinstance(states, dict) else None
    if not isinstance(module, dict):
        raise CheckpointError(f"{path}: no `module` weights in this DeepSpeed checkpoint")
    empty = [k for k, v in module.items() if v.numel() == 0]
    if empty:
        raise CheckpointError(
            f"{path}: the module weights are ZeRO-3 partitions ({len(empty)} empty tensors, e.g. {empty[:3]}) "
            "and the optimizer state files they are rebuilt from are missing; predict from the run directory "
            "once training wrote weights/trainable.safetensors"
        )
    return {
        k: v.float() if v.is_floating_point() else v for k, v in _strip(module, ("_forward_module.", "model.")).items()
    }


# ------------------------------------------------------------------------------------------- resolving ckpt=
def preset(name: str) -> ModelConfig:
    """The ModelConfig of conf/model/<name>.yaml."""
    path = CONF_MODEL / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONF_MODEL.glob("*.yaml"))
        raise ConfigError(f"model={name}: no such preset; known: {known}")
    node = OmegaConf.load(path).get("model")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))  # type: ignore[return-value]


def matching_presets(folder_path: Path) -> list[str]:
    """Presets whose architecture agrees with the checkpoint folder's config.json."""
    folder = read_folder(folder_path)
    arch = folder_architecture(folder)
    names = []
    for path in sorted(CONF_MODEL.glob("*.yaml")):
        try:
            merge_architecture(preset(path.stem), folder, arch)
        except (CheckpointError, ConfigError, TypeError, ValueError):
            continue
        names.append(path.stem)
    return names


def resolve_source(ckpt: str, model: ModelConfig | None = None, given: dict[str, Any] | None = None) -> ModelSource:
    """Recognises the form of `ckpt` (see the module docstring); reads configs only, no weights.

    Args:
        ckpt: the `ckpt=` value.
        model: the `model=<preset>` given on the command line, if any (needed for `random`, optional for
            released folders).
        given: the model keys the command line set (`model=<preset>` and/or `model.<key>=...`). For a checkpoint
            that carries its own model config (run, Lightning, DeepSpeed, native, adapter), one that contradicts
            it is refused naming both values; runtime fields (`dtype`, `attn_implementation`, ...) are applied
            and reported.
    """
    source = _resolve(ckpt, model)
    if given and source.form in ("run", "lightning", "deepspeed", "native", "adapter"):
        source = with_model_options(source, given)
    return source


def with_model_options(source: ModelSource, given: dict[str, Any]) -> ModelSource:
    """`source` with the command line's model options applied, or a ConfigError naming each contradiction."""
    own = source.model_cfg
    contradictions, runtime = model_differences(own, given)
    if source.form == "adapter":  # its model is rebuilt from the folder's own config: nothing can be changed
        contradictions, runtime = contradictions + runtime, []
    named = f"model={given['name']}" if given.get("name") else "model options"
    if contradictions:
        raise ConfigError(
            f"{named} contradicts ckpt={source.path}, a {source.form} checkpoint of model {own.name}: "
            f"{describe_differences(contradictions, 'checkpoint', 'given')}; drop the model option to use the "
            "checkpoint's own model, or pass a checkpoint of that model"
        )
    if not runtime:
        return source
    changes = {key.split(".")[1]: given[key.split(".")[1]] for key, _, _ in runtime}
    model_cfg = dataclasses.replace(own, **changes)
    train_cfg = dataclasses.replace(source.train_cfg, model=model_cfg) if source.train_cfg is not None else None
    print(
        f"vseg: applied to ckpt={source.path}: {describe_differences(runtime, 'checkpoint', 'given', 20)}", flush=True
    )
    return dataclasses.replace(source, model_cfg=model_cfg, train_cfg=train_cfg)


def trained_source(ckpt: str | Path) -> ModelSource:
    """`ckpt` resolved, refused unless it is a training run: a run directory (its final weights, else its newest
    complete checkpoint), a Lightning checkpoint or a DeepSpeed checkpoint. Reads configs only."""
    source = resolve_source(str(ckpt))
    if source.form not in TRAINED_FORMS:
        raise ConfigError(
            f"ckpt={ckpt} is a {source.form} model, not a training run; pass a run directory, a Lightning .ckpt "
            "or a DeepSpeed checkpoint directory"
        )
    return source


def rebuild_run(ckpt: str | Path) -> tuple[TrainConfig, Sa2VA, Any]:
    """A training run's config and model as training left it (trainable parameters trainable, LoRA unmerged),
    on the CPU, by the loader predict.py's `Predictor` uses (`ModelSource.build`)."""
    source = trained_source(ckpt)
    model, tokenizer = source.build("cpu", frozen=False)
    assert source.train_cfg is not None
    return source.train_cfg, model, tokenizer


def check_weights_file(source: ModelSource) -> None:
    """Reads what can be read cheaply before anything is written: the trained weights file of a run (header)
    or a Lightning checkpoint (mmap). A truncated, corrupt or UNSAFE file is a CheckpointError naming it."""
    if source.weights_file is None:
        return
    if source.form == "run":
        check_safetensors(source.weights_file, WEIGHTS_FIX.format(run=source.path))
    elif source.form == "lightning":
        load_checkpoint(source.weights_file)


def _resolve(ckpt: str, model: ModelConfig | None = None) -> ModelSource:
    if ckpt == "random":
        if model is None:
            raise ConfigError("ckpt=random needs model=<preset> (the architecture to build with random weights)")
        return ModelSource("random", None, model)
    path = Path(ckpt).expanduser().resolve()
    if not path.exists():
        raise ConfigError(f"ckpt={ckpt}: no such file or directory")
    if path.is_file():
        if path.suffix == ".ckpt":
            cfg = load_train_config(config_near(path))
            return ModelSource("lightning", path, cfg.model, cfg, path)
        raise ConfigError(
            f"ckpt={ckpt}: a {path.suffix or 'suffix-less'} file is not a checkpoint form vseg reads; pass a run "
            "directory, a Lightning .ckpt, a DeepSpeed checkpoint directory or an exported / released model folder"
        )
    if (path / "config.yaml").is_file():
        cfg = load_train_config(path / "config.yaml")
        weights = path / "weights" / "trainable.safetensors"
        if weights.is_file():
            return ModelSource("run", path, cfg.model, cfg, weights)
        newest = newest_checkpoint(path / "checkpoints")
        if newest is None:
            raise ConfigError(
                f"ckpt={ckpt}: weights/trainable.safetensors not found at {weights} and no complete checkpoint in "
                f"{path / 'checkpoints'}; pass a training run directory that has trained weights"
            )
        log.info("run %s has no final weights yet: using its newest checkpoint %s", path, newest.name)
        return _resolve(str(newest), model)
    states = deepspeed_model_states(path)
    if states is not None:
        cfg = load_train_config(config_near(path))
        return ModelSource("deepspeed", path, cfg.model, cfg, states)
    if (path / "config.json").is_file():
        try:
            if json.loads((path / "config.json").read_text()).get("vseg_format") == "adapter":
                raw = json.loads((path / "config.json").read_text())["train"]
                cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), raw))
                return ModelSource("adapter", path, cfg.model, None)  # type: ignore[union-attr]
        except (json.JSONDecodeError, AttributeError):
            pass  # read_folder names the problem
        folder = read_folder(path)  # raises, naming the model_type, for anything that is not a Sa2VA folder
        config = folder.config
        if folder.kind == "native":
            data = dict(config["model"])
            base = model or ModelConfig()
            cfg = dataclasses.replace(
                OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), data)),  # type: ignore[arg-type]
                path=str(path),
                attn_implementation=base.attn_implementation,
            )
            return ModelSource("native", path, cfg)
        if model is None:
            names = matching_presets(path)
            if not names:
                raise ConfigError(
                    f"ckpt={ckpt}: no conf/model preset matches this folder's architecture; pass model=<preset>"
                )
            if len(names) > 1:
                log.info("presets %s all match %s; using %s (pass model= to choose)", names, path, names[0])
            model = preset(names[0])
        return ModelSource("official", path, dataclasses.replace(model, path=str(path)))
    raise ConfigError(
        f"ckpt={ckpt}: not a checkpoint form vseg knows (no config.yaml, no config.json, no DeepSpeed "
        f"mp_rank_00_model_states.pt); expected one of: run directory, Lightning .ckpt, DeepSpeed checkpoint "
        "directory, native/official/adapter export, released Sa2VA folder, or `random` with model=<preset>"
    )


def _strip(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out
