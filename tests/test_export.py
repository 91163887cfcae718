"""`vseg export`: a trained run -> native / official / adapter folders that load back into vseg exactly."""

from __future__ import annotations

import dataclasses
import json

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from tests.conftest import tiny_cfg
from tests.test_checkpoint import model_outputs
from vseg.artifacts import build_sa2va
from vseg.artifacts.adapters import load_adapter_folder, merge_adapters
from vseg.artifacts.folders import write_native_folder
from vseg.artifacts.sources import rebuild_run
from vseg.cli import main as cli
from vseg.training.module import trainable_state_dict


def _move_trainable(model) -> None:
    """Moves every trainable tensor off its initial value (a stand-in for training), deterministically."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as train.py leaves it, with every trainable tensor moved off its initial value."""
    cfg = tiny_cfg(["lora.r=4", "lora.alpha=8"])
    L.seed_everything(cfg.seed, verbose=False)
    model, _ = build_sa2va(cfg.model, cfg.lora)
    _move_trainable(model)
    run = tmp_path_factory.mktemp("run")
    OmegaConf.save(OmegaConf.structured(cfg), run / "config.yaml")
    (run / "weights").mkdir()
    save_file(
        {k: v.contiguous() for k, v in trainable_state_dict(model).items()},
        str(run / "weights" / "trainable.safetensors"),
    )
    return run


def _export(run_dir, out, fmt, *extra) -> int:
    return cli(["export", f"ckpt={run_dir}", f"out={out}", f"format={fmt}", *extra])


def _all_tensors(folder):
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


@pytest.mark.parametrize("fmt", ["native", "official"])
def test_merged_export_loads_back_exactly(run_dir, tmp_path, fmt):
    out = tmp_path / fmt
    assert _export(run_dir, out, fmt, "max_shard_size_mb=0.5") == 0
    assert not list(tmp_path.glob(".*partial*"))
    cfg, unmerged, tokenizer = rebuild_run(run_dir)
    reference = model_outputs(unmerged, tokenizer, cfg.model)
    merged = merge_adapters(unmerged)
    loaded, loaded_tokenizer = build_sa2va(dataclasses.replace(cfg.model, path=str(out)), None)
    # Bit-exact: the folder holds exactly the merged weights.
    mine, theirs = merged.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs)
    assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == []
    # Merged == unmerged (LoRA and the trained [SEG] rows folded in), within float tolerance.
    for a, b in zip(reference, model_outputs(loaded, loaded_tokenizer, cfg.model), strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    if fmt == "native":
        # export -> import -> export round-trips exactly.
        again = tmp_path / "again"
        again.mkdir()
        write_native_folder(loaded, dataclasses.replace(cfg.model), loaded_tokenizer, again, "float32", 1 << 30)
        first, second = _all_tensors(out), _all_tensors(again)
        assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    else:
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["Sa2VAChatModel"] and config["llm_config"]["vocab_size"] == len(tokenizer)
        assert (
            "language_model.lm_head.weight"
            in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        )


def test_adapter_export_is_small_and_reapplies_exactly(run_dir, tmp_path):
    out = tmp_path / "adapter"
    assert _export(run_dir, out, "adapter") == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "vseg_modules.safetensors", "config.json"} <= names
    cfg, model, tokenizer = rebuild_run(run_dir)
    _, again, again_tokenizer = load_adapter_folder(out)
    for a, b in zip(
        model_outputs(model, tokenizer, cfg.model), model_outputs(again, again_tokenizer, cfg.model), strict=True
    ):
        assert torch.equal(a, b)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    stored = sum(
        t.numel()
        for f in ("adapter_model.safetensors", "vseg_modules.safetensors")
        for t in load_file(str(out / f)).values()
    )
    assert stored < frozen / 2


def test_export_reads_a_run_without_final_weights_from_its_newest_checkpoint(run_dir, tmp_path, capsys):
    """The loader predict.py uses: a run stopped before its final weights exports from its newest checkpoint
    (also passed as the .ckpt itself), the same weights as the finished run; a model that is not a training
    run is refused before anything is written."""
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints").mkdir(parents=True)
    (stopped / "config.yaml").write_bytes((run_dir / "config.yaml").read_bytes())
    weights = load_file(str(run_dir / "weights" / "trainable.safetensors"))
    state = {"global_step": 2, "state_dict": {f"model.{k}": v for k, v in weights.items()}, "vseg": {}}
    torch.save(state, stopped / "checkpoints" / "step0000002.ckpt")
    exports = tmp_path / "exports"
    assert _export(run_dir, exports / "finished", "native") == 0
    assert _export(stopped, exports / "from_run", "native") == 0
    assert _export(stopped / "checkpoints" / "step0000002.ckpt", exports / "from_ckpt", "native") == 0
    finished = _all_tensors(exports / "finished")
    for name in ("from_run", "from_ckpt"):
        other = _all_tensors(exports / name)
        assert set(other) == set(finished) and all(torch.equal(other[k], finished[k]) for k in finished)
    capsys.readouterr()
    assert _export(exports / "finished", tmp_path / "again", "native") == 2
    assert "is a native model, not a training run" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_export_refuses_a_non_empty_out_unless_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _export(run_dir, out, "native") == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert _export(run_dir, out, "native", "overwrite=true") == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no partial or old folders left behind


def test_export_rejects_bad_arguments(run_dir, tmp_path, capsys):
    assert _export(run_dir, tmp_path / "x", "onnx") == 2
    assert "format='onnx'" in capsys.readouterr().err
    assert _export(tmp_path / "nope", tmp_path / "y", "native") == 2
    assert _export(run_dir, run_dir / "inside", "native") == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "overrides",
    [["model=tiny_qwen2_5vl"], ["model=tiny_qwen3vl", "model.tie_word_embeddings=false"]],
    ids=["qwen2_5_vl", "qwen3_vl"],
)
def test_qwen_run_from_a_released_folder_exports_official_and_loads_back(tmp_path, overrides):
    """A LoRA run started from a (tiny) released Qwen-VL folder -> `vseg export format=official` -> the released
    layout again (the release's config.json and processor files kept), loading back bit-exactly."""
    from vseg.artifacts.folders import write_official_folder

    base_cfg = tiny_cfg(overrides).model
    torch.manual_seed(0)
    base_model, base_tokenizer = build_sa2va(base_cfg, None)
    release = tmp_path / "release"
    release.mkdir()
    write_official_folder(base_model, base_cfg, base_tokenizer, release, "float32", max_shard_bytes=300_000)

    cfg = tiny_cfg([*overrides, f"model.path={release}", "lora.r=4", "lora.alpha=8"])
    model, _ = build_sa2va(cfg.model, cfg.lora)
    _move_trainable(model)
    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(cfg), run / "config.yaml")
    trainable = {k: v.contiguous() for k, v in trainable_state_dict(model).items()}
    save_file(trainable, str(run / "weights" / "trainable.safetensors"))

    out = tmp_path / "official"
    assert _export(run, out, "official", "max_shard_size_mb=0.2") == 0
    config, released = json.loads((out / "config.json").read_text()), json.loads((release / "config.json").read_text())
    assert config == released  # same vocabulary and dtype: the release's config.json unchanged
    assert (out / "preprocessor_config.json").read_bytes() == (release / "preprocessor_config.json").read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(json.loads((release / "model.safetensors.index.json").read_text())["weight_map"])

    run_cfg, unmerged, tokenizer = rebuild_run(run)
    reference = model_outputs(unmerged, tokenizer, run_cfg.model)
    merged = merge_adapters(unmerged)
    loaded, loaded_tokenizer = build_sa2va(dataclasses.replace(run_cfg.model, path=str(out)), None)
    mine, theirs = merged.state_dict(), loaded.state_dict()
    assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == []
    for a, b in zip(reference, model_outputs(loaded, loaded_tokenizer, run_cfg.model), strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
