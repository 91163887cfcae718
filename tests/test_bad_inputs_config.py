"""Bad inputs to configs, resumes and weight files (issue 16): every one refused with one sentence, exit 2,
no traceback, and nothing of another run touched."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vseg.artifacts.folders import CheckpointError
from vseg.config import ConfigError

from conftest import ROOT, tiny_cfg

BASE = [
    "data.num_samples=4",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "checkpoint.every_n_steps=2",
]


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (and every directory, as "dir")."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_cli(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def _junk(n: int) -> bytes:
    """Bytes that are no file format (seeded: the same every run)."""
    import random

    return random.Random(16).randbytes(n)


class _Evil:
    """A pickle that would create a file if it were ever unpickled without weights_only."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    _Evil.marker = str(marker)
    torch.save({"state_dict": {}, "payload": _Evil()}, path)
    return path


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory) -> Path:
    """A finished 2-step tiny_qwen3vl run (config.yaml, tensorboard/, checkpoints/, weights/)."""
    from vseg.training.run import RUN_DIR_ENV, run

    run_dir = tmp_path_factory.mktemp("runs") / "qwen"
    old = os.environ.pop(RUN_DIR_ENV, None)
    try:
        run(tiny_cfg(["model=tiny_qwen3vl", f"run_dir={run_dir}", *BASE]))
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
        if old is not None:
            os.environ[RUN_DIR_ENV] = old
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    return run_dir


@pytest.fixture
def run_copy(qwen_run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(qwen_run, target)
    return target


# ----------------------------------------------------------------------------- 4. trainer.* checked up front
@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("trainer.max_steps=abc", ["trainer.max_steps='abc'", "expected int"]),
        ("trainer.max_steps=-5", ["trainer.max_steps=-5", "-1"]),
        ("trainer.max_steps=true", ["trainer.max_steps=True", "expected int"]),
        ("trainer.max_epochs=-2", ["trainer.max_epochs=-2", ">= 0"]),
        ("trainer.max_epochs=2.5", ["trainer.max_epochs=2.5", "int | null"]),
        ("trainer.devices=-3", ["trainer.devices=-3", "count >= 1"]),
        ("trainer.devices=0", ["trainer.devices=0", "count >= 1"]),
        ("trainer.devices=abc", ["trainer.devices='abc'", "auto"]),
        ("trainer.num_nodes=0", ["trainer.num_nodes=0", ">= 1"]),
        ("trainer.accumulate_grad_batches=0", ["trainer.accumulate_grad_batches=0", ">= 1"]),
        ("trainer.accumulate_grad_batches=1.5", ["trainer.accumulate_grad_batches=1.5", "expected int"]),
        ("trainer.val_check_interval=1.5", ["trainer.val_check_interval=1.5", "(0.0, 1.0]"]),
        ("trainer.val_check_interval=-1", ["trainer.val_check_interval=-1", "batches >= 1"]),
        ("trainer.check_val_every_n_epoch=0", ["trainer.check_val_every_n_epoch=0", ">= 1"]),
        ("trainer.limit_val_batches=-0.5", ["trainer.limit_val_batches=-0.5", "[0.0, 1.0]"]),
        ("trainer.num_sanity_val_steps=-2", ["trainer.num_sanity_val_steps=-2", "-1"]),
        ("trainer.log_every_n_steps=0", ["trainer.log_every_n_steps=0", ">= 1"]),
        ("trainer.gradient_clip_val=-1", ["trainer.gradient_clip_val=-1", ">= 0"]),
        ("+trainer.gradient_clip_algorithm=clip", ["trainer.gradient_clip_algorithm='clip'", "value | norm"]),
        ("trainer.precision=bf17", ["trainer.precision='bf17'", "bf16-mixed"]),
        ("trainer.fast_dev_run=-1", ["trainer.fast_dev_run=-1", ">= 0"]),
        ("trainer.accelerator=tpux", ["trainer.accelerator='tpux'", "cpu"]),
        ("+trainer.max_stepz=3", ["unknown lightning.Trainer arguments", "max_stepz"]),
        ("+trainer.logger=false", ["trainer.logger", "TensorBoard"]),
        ("+trainer.callbacks=[]", ["trainer.callbacks", "callbacks itself"]),
        ("+trainer.default_root_dir=/tmp/x", ["trainer.default_root_dir", "run_dir="]),
    ],
)
def test_bad_trainer_values_are_refused_before_anything_is_built(override, words):
    with pytest.raises(ConfigError) as err:
        tiny_cfg([override])
    message = str(err.value)
    assert all(w in message for w in words), message
    assert message.count("trainer.devices") <= 1  # reported once, not again by the strategy checks


@pytest.mark.parametrize(
    "override",
    [
        "trainer.max_epochs=-1",
        "trainer.max_steps=0",
        "trainer.deterministic=warn",
        "trainer.val_check_interval=0.5",
        "trainer.val_check_interval='00:00:10:00'",
        "trainer.limit_val_batches=3",
        "trainer.precision=bf16-mixed",
        "trainer.devices=auto",
    ],
)
def test_good_trainer_values_still_pass(override):
    tiny_cfg([override])


def test_device_lists_and_counts_follow_lightning():
    for devices in ("[0,1]", "2", "-1", "'0,1'"):
        tiny_cfg(["strategy=ddp", "trainer.accelerator=cpu", f"trainer.devices={devices}"])
    with pytest.raises(ConfigError, match=r"trainer.devices=\[0, 0\]"):
        tiny_cfg(["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=[0,0]"])


# ----------------------------------------------------------------------------- 4. Hydra's own errors
@pytest.mark.parametrize(
    ("script", "override", "words"),
    [
        ("train.py", "trainer.max_steps=[", ["trainer.max_steps=["]),
        ("train.py", "foo=1", ["Could not override 'foo'", "+foo=1"]),
        ("train.py", "model=nosuch", ["model/nosuch", "tiny_qwen3vl"]),
        ("predict.py", "model=nosuch", ["model/nosuch", "tiny_qwen2_5vl"]),
        ("predict.py", "lora=small", ["Could not override 'lora'", "+lora=small"]),
    ],
)
def test_hydra_errors_leave_as_one_line_with_exit_2(script, override, words):
    result = run_cli(script, override)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vseg: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize(
    ("command", "override"),
    [("plan", "trainer.max_steps=["), ("info", "model=nosuch"), ("check", "data.num_samples=abc")],
)
def test_vseg_commands_report_config_errors_with_exit_2(command, override, capsys):
    from vseg.cli import main

    assert main([command, override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vseg {command}: ") and "\n" not in err, err


def test_a_bad_trainer_value_stops_train_py_before_the_data_check(tmp_path):
    result = run_cli("train.py", "trainer.max_steps=-5", f"runs_root={tmp_path}", "data.num_samples=4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "trainer.max_steps=-5" in result.stderr
    assert "data:" not in result.stdout and not any(tmp_path.iterdir())  # no data read, no run directory


# ----------------------------------------------------------------------------- 1. refused resume damages nothing
@pytest.mark.slow
def test_resume_with_another_model_is_refused_and_the_run_untouched(run_copy):
    before = snapshot(run_copy)
    result = run_cli("train.py", "model=tiny", f"ckpt_path={run_copy}/checkpoints/last.ckpt", *BASE)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "tiny_qwen3vl" in message and "model tiny" in message
    assert "'qwen3_vl'" in message and "'internvl'" in message  # both values named
    assert snapshot(run_copy) == before
    # and the run still predicts as itself
    from vseg.artifacts.sources import resolve_source

    assert resolve_source(str(run_copy)).model_cfg.name == "tiny_qwen3vl"


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["model=tiny"], ["model.family: 'qwen3_vl'", "'internvl'", "holds a run of model tiny_qwen3vl"]),
        (["model=tiny_qwen3vl", "lora.r=8"], ["lora.r: 16", "vs 8"]),
        (["model=tiny_qwen3vl", "model.text.hidden_size=128"], ["model.text.hidden_size: 64", "vs 128"]),
        (["model=tiny_qwen3vl", "lora.target_modules=[q_proj]"], ["lora.target_modules"]),
    ],
)
def test_train_refuses_another_model_in_a_run_dir_and_writes_nothing(run_copy, overrides, words):
    from vseg.training.run import RUN_DIR_ENV, run

    before = snapshot(run_copy)
    try:
        with pytest.raises(ConfigError) as err:
            run(tiny_cfg([*overrides, f"run_dir={run_copy}", *BASE]))
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert snapshot(run_copy) == before


def test_a_checkpoint_of_another_model_is_refused_for_a_new_run_dir(run_copy, tmp_path):
    from vseg.training.run import RUN_DIR_ENV, run

    before = snapshot(run_copy)
    new = tmp_path / "new_run"
    try:
        with pytest.raises(ConfigError) as err:
            run(tiny_cfg(["model=tiny", f"run_dir={new}", f"ckpt_path={run_copy}/checkpoints/last.ckpt", *BASE]))
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    assert "written by a run of model tiny_qwen3vl" in str(err.value) and "'internvl'" in str(err.value)
    assert not new.exists() and snapshot(run_copy) == before


def test_a_checkpoint_without_its_run_config_is_checked_by_its_weights(run_copy, tmp_path):
    from vseg.training.run import check_resume

    lone = tmp_path / "lone.ckpt"
    shutil.copy(run_copy / "checkpoints" / "last.ckpt", lone)
    with pytest.raises(ConfigError, match=r"another model than this command's model tiny \(missing \d+"):
        check_resume(tiny_cfg([]), lone, tmp_path / "fresh")
    check_resume(tiny_cfg(["model=tiny_qwen3vl"]), lone, tmp_path / "fresh")  # its own model: accepted


@pytest.mark.parametrize("case", ["missing", "truncated", "random", "no_state_dict"])
def test_unreadable_resume_checkpoints_are_one_sentence(run_copy, tmp_path, case):
    from vseg.training.run import check_resume

    path = tmp_path / f"{case}.ckpt"
    if case == "truncated":
        data = (run_copy / "checkpoints" / "last.ckpt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "random":
        path.write_bytes(_junk(4096))
    elif case == "no_state_dict":
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ConfigError) as err:
        check_resume(tiny_cfg(["model=tiny_qwen3vl"]), path, tmp_path / "fresh")
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    expected = {
        "missing": "no such file",
        "truncated": "truncated, corrupt",
        "random": "not a torch checkpoint",
        "no_state_dict": "no `state_dict`",
    }
    assert expected[case] in message


def test_resume_never_is_refused_before_the_config_is_rewritten(run_copy):
    from vseg.training.run import RUN_DIR_ENV, run

    before = snapshot(run_copy)
    try:
        with pytest.raises(ConfigError, match="resume=never"):
            run(tiny_cfg(["model=tiny_qwen3vl", f"run_dir={run_copy}", "resume=never", *BASE]))
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    assert snapshot(run_copy) == before


# ----------------------------------------------------------------------------- 2. model options on predict
def test_predict_refuses_a_contradicting_model_and_writes_nothing(run_copy):
    before = snapshot(run_copy)
    result = run_cli("predict.py", f"ckpt={run_copy}", "model=tiny", "num_workers=0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "model=tiny contradicts" in message and "tiny_qwen3vl" in message
    assert "model.family: 'qwen3_vl' (checkpoint) vs 'internvl' (given)" in message
    assert snapshot(run_copy) == before  # no predictions/ in the run


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ({"name": "x", "family": "internvl"}, ["model.family: 'qwen3_vl' (checkpoint) vs 'internvl' (given)"]),
        ({"text": {"hidden_size": 128}}, ["model.text.hidden_size: 64 (checkpoint) vs 128 (given)"]),
        ({"template": "phi3_chat"}, ["model.template: 'qwen_chat' (checkpoint) vs 'phi3_chat' (given)"]),
        ({"path": "/models/other"}, ["model.path: None (checkpoint) vs '/models/other' (given)"]),
    ],
)
def test_contradicting_model_options_name_both_values(qwen_run, given, words):
    from vseg.artifacts.sources import resolve_source

    with pytest.raises(ConfigError) as err:
        resolve_source(str(qwen_run), None, given)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_compatible_model_options_are_applied_and_reported(qwen_run, capsys):
    from vseg.artifacts.sources import resolve_source
    from vseg.predict import _model_override

    pcfg = OmegaConf.create({"model": {**OmegaConf.load(ROOT / "conf/model/tiny_qwen3vl.yaml").model}})
    pcfg.model.attn_implementation = "eager"
    model, given = _model_override(pcfg)
    assert model is not None and given["attn_implementation"] == "eager"
    source = resolve_source(str(qwen_run), model, given)
    assert source.model_cfg.attn_implementation == "eager"
    assert source.train_cfg.model.attn_implementation == "eager"  # what build() uses
    out = capsys.readouterr().out
    assert "model.attn_implementation: 'sdpa' (checkpoint) vs 'eager' (given)" in out
    same = resolve_source(str(qwen_run), None, {"name": "tiny_qwen3vl", "family": "qwen3_vl"})
    assert same.model_cfg == resolve_source(str(qwen_run)).model_cfg
    with pytest.raises(ConfigError, match=r"model: unknown keys \['colour'\]"):
        _model_override(OmegaConf.create({"model": {"colour": "red"}}))


# ----------------------------------------------------------------------------- 6. corrupt and unsafe weights
def _predict_cfg(ckpt: Path, out: Path):
    from vseg.config import compose

    return compose("predict", [f"ckpt={ckpt}", f"output={out}", "num_workers=0", "limit=1"])


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_corrupt_run_weights_are_refused_by_predict_and_export(run_copy, tmp_path, damage, capsys):
    from vseg.cli import main
    from vseg.predict import run

    weights = run_copy / "weights" / "trainable.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else _junk(len(data)))
    with pytest.raises(CheckpointError) as err:
        run(_predict_cfg(run_copy, tmp_path / "pred"))
    message = str(err.value)
    assert str(weights) in message and "truncated or corrupt" in message and "vseg weights ckpt=" in message
    assert not (tmp_path / "pred").exists()  # refused before the output folder was made
    assert main(["export", f"ckpt={run_copy}", f"out={tmp_path / 'exp'}"]) == 2
    err_text = capsys.readouterr().err
    assert str(weights) in err_text and "Traceback" not in err_text
    assert not (tmp_path / "exp").exists() and not list(tmp_path.glob(".exp.partial-*"))


def test_vseg_weights_refuses_random_bytes(tmp_path, capsys):
    from vseg.cli import main

    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(_junk(5000))
    assert main(["weights", f"ckpt={junk}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vseg weights: ") and str(junk) in err and "not a torch checkpoint" in err
    assert "\n" not in err


@pytest.mark.parametrize("entry", ["train", "predict", "weights"])
def test_a_pickle_that_runs_code_is_reported_unsafe_and_never_run(run_copy, tmp_path, entry, capsys):
    marker = tmp_path / "PWNED"
    evil = evil_checkpoint(run_copy / "checkpoints" / "evil.ckpt", marker)
    if entry == "train":
        from vseg.training.run import check_resume

        with pytest.raises(CheckpointError) as err:
            check_resume(tiny_cfg(["model=tiny_qwen3vl"]), evil, run_copy)
        message = str(err.value)
    elif entry == "predict":
        from vseg.predict import run

        with pytest.raises(CheckpointError) as err:
            run(_predict_cfg(evil, tmp_path / "pred"))
        message = str(err.value)
        assert not (tmp_path / "pred").exists()
    else:
        from vseg.cli import main

        assert main(["weights", f"ckpt={evil}"]) == 2
        message = capsys.readouterr().err
    assert "UNSAFE" in message and "posix.system" in message.replace("nt.system", "posix.system")
    assert str(evil) in message and "missing" not in message  # not reported as a key mismatch
    assert not marker.exists()


def test_unsafe_detection_reads_plain_pickles_too(tmp_path):
    from vseg.artifacts.loading import load_torch_file, unsafe_globals

    marker = tmp_path / "PWNED"
    _Evil.marker = str(marker)
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps({"x": _Evil()}))
    assert unsafe_globals(raw) in (["posix.system"], ["nt.system"])
    with pytest.raises(CheckpointError, match="UNSAFE"):
        load_torch_file(raw)
    assert not marker.exists()
