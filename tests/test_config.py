"""Every config option composes and validates; bad values fail with one clear message."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from vseg.config import ConfigError, load_config, validate
from vseg.strategy import build_strategy

from conftest import CONF, ROOT, compose_cfg, tiny_cfg

GROUPS = ["model", "data", "lora", "strategy", "trainer", "logger", "callbacks"]


@pytest.mark.parametrize(
    "override",
    [f"{group}={path.stem}" for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))],
)
def test_every_option_composes(override, tmp_path):
    group = override.split("=")[0]
    extra = ["trainer.devices=4"] if group == "strategy" and not override.endswith(("single", "ddp")) else []
    if override in ("data=folders", "data=drive"):
        extra = [f"data.root={tmp_path}"]  # paths are checked up front; the files are vseg check's business
    if override in ("data=polygons", "data=coco"):
        (tmp_path / "a.json").write_text("[]")
        extra = [f"data.annotations={tmp_path / 'a.json'}"]
    cfg = compose_cfg([override, *extra])
    from omegaconf import OmegaConf

    from vseg.config import TrainConfig

    typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg))
    validate(typed, cuda_available=True)  # as on a GPU machine: every option is valid there


@pytest.mark.parametrize(
    ("name", "kind", "stage", "offload_opt", "offload_param"),
    [
        ("ddp", DDPStrategy, None, None, None),
        ("zero2", DeepSpeedStrategy, 2, False, False),
        ("zero2_offload", DeepSpeedStrategy, 2, True, False),
        ("zero3", DeepSpeedStrategy, 3, False, False),
        ("zero3_offload", DeepSpeedStrategy, 3, True, True),
    ],
)
def test_strategies_build_the_right_lightning_object(name, kind, stage, offload_opt, offload_param):
    cfg = compose_cfg([f"strategy={name}"])
    from omegaconf import OmegaConf

    from vseg.config import StrategyConfig

    strategy_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StrategyConfig), cfg.strategy))
    strategy = build_strategy(strategy_cfg)
    assert isinstance(strategy, kind)
    if kind is DeepSpeedStrategy:
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == stage
        assert ("offload_optimizer" in zero) == offload_opt
        assert ("offload_param" in zero) == offload_param
        assert strategy.exclude_frozen_parameters  # checkpoints hold trainable weights only


def test_single_is_auto():
    assert build_strategy(tiny_cfg().strategy) == "auto"


def test_unknown_group_option_is_named():
    with pytest.raises(MissingConfigException, match="nonexistent"):
        compose_cfg(["model=nonexistent"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(compose_cfg(["data.batch_size=many"]))


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["data.bogus=1"])
    with pytest.raises(ConfigError, match="bogus"):
        load_config(compose_cfg(["+data.bogus=1"]))


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        tiny_cfg(["data.repeats=0", "optim.lr=-1", "data.answer=no seg here", "+trainer.bogus_arg=1"])
    message = str(err.value)
    for needle in ("data.repeats", "optim.lr", "data.answer", "bogus_arg"):
        assert needle in message


def test_gpu_only_strategy_without_cuda_says_what_to_do():
    cfg = compose_cfg(["strategy=zero2_offload", "trainer.devices=4"])
    from omegaconf import OmegaConf

    from vseg.config import TrainConfig

    typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg))
    with pytest.raises(ConfigError, match="needs CUDA GPUs"):
        validate(typed, cuda_available=False)


def test_single_strategy_rejects_several_devices():
    with pytest.raises(ConfigError, match="strategy=single"):
        tiny_cfg(["trainer.devices=4"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA message")
def test_entry_point_stops_at_once_without_cuda():
    proc = subprocess.run(
        [sys.executable, "train.py", "strategy=zero2_offload", "trainer.devices=4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "needs CUDA GPUs" in proc.stderr
    assert "Traceback" not in proc.stderr
