"""Placements: data-parallel (Lightning DDP, 2 CPU processes; GPUs on the device machine), model-parallel
(`device_map` over 2 GPUs; the split policy on CPU), and a real DeepSpeed checkpoint (GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from vseg.config import compose
from vseg.data.synthetic import generate_vessels
from vseg.predict import run as predict

from conftest import ROOT

gpu = pytest.mark.gpu
multigpu = pytest.mark.multigpu


def _cfg(*overrides: str, **values):
    return OmegaConf.merge(compose("predict", list(overrides)), values)


def _images(folder: Path, n: int, size: int = 96) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, _ = generate_vessels(seed=100 + i, size=size + 8 * i, style="angiogram")
        Image.fromarray(image).save(folder / f"im{i}.png")
    return folder


def _results(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def _masks(out: Path) -> dict[str, np.ndarray]:
    return {r["id"]: np.asarray(Image.open(out / r["mask"])) for r in _results(out)}


def _cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_data_parallel_over_two_cpu_processes_equals_one(tmp_path):
    images = _images(tmp_path / "in", 5)
    single = predict(_cfg("ckpt=random", "model=tiny", input=str(images), output=str(tmp_path / "one"), batch_size=2))
    proc = _cli(
        "ckpt=random",
        "model=tiny",
        f"input={images}",
        f"output={tmp_path / 'two'}",
        "devices=2",
        "accelerator=cpu",
        "batch_size=2",
        "num_workers=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _results(tmp_path / "two")
    assert [r["id"] for r in lines] == [f"im{i}" for i in range(5)]  # merged in input order, each once
    journals = sorted((tmp_path / "two" / "progress").glob("rank*.jsonl"))
    per_rank = [[json.loads(x)["id"] for x in j.read_text().splitlines()] for j in journals]
    assert sorted(len(r) for r in per_rank) == [2, 3] and not set(per_rank[0]) & set(per_rank[1])  # disjoint shards
    one, two = _masks(tmp_path / "one"), _masks(tmp_path / "two")
    assert one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)
    first = {r["id"]: r["mean_logit"] for r in _results(tmp_path / "one")}
    assert all(r["mean_logit"] == pytest.approx(first[r["id"]], rel=1e-5) for r in lines)
    assert (
        single["ok"] == 5
        and "data-parallel x2" in json.loads((tmp_path / "two" / "summary.json").read_text())["placement"]
    )


def test_device_map_keeps_blocks_whole_and_uses_every_gpu_budget():
    from vseg.artifacts.sources import preset
    from vseg.inference.placement import no_split_classes, plan_device_map
    from vseg.model.random_init import build_meta

    model, _ = build_meta(preset("tiny"))
    classes = no_split_classes(model)
    assert {"Qwen2DecoderLayer", "InternVLVisionLayer", "Sam2MultiScaleBlock", "Sam2MaskDecoder"} <= set(classes)
    size = sum(p.numel() * 4 for p in model.parameters())
    device_map = plan_device_map(model, "sequential", {0: int(size * 0.8), 1: int(size * 0.8)}, torch.float32)
    assert set(device_map.values()) == {0, 1}
    # no key splits a no-split block: every mapped module is a block or a container of whole blocks
    for name in device_map:
        # a key inside a no-split block would mean the block was split
        parents = [name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)]
        assert not any(type(model.get_submodule(p)).__name__ in classes for p in parents), name


# ---------------------------------------------------------------------------------------------- GPU
@gpu
@multigpu
def test_model_parallel_over_two_gpus_equals_one_gpu(tmp_path):
    from vseg.artifacts.sources import ModelSource, preset
    from vseg.config import load_predict_config
    from vseg.inference.placement import devices_of, parse_max_memory
    from vseg.model.random_init import build_meta
    from vseg.predict import load_predictor

    assert torch.cuda.device_count() >= 2
    images = _images(tmp_path / "in", 4)
    common = dict(input=str(images), batch_size=4, dtype="float32")
    one = predict(_cfg("ckpt=random", "model=tiny", output=str(tmp_path / "one"), **common))
    size = sum(p.numel() * 4 for p in build_meta(preset("tiny"))[0].parameters())
    budget = {0: int(size * 0.55), 1: int(size * 1.0)}
    opts = load_predict_config(_cfg("ckpt=random", device_map="sequential", max_memory=budget, **common))
    source = ModelSource("random", None, preset("tiny"))
    model = load_predictor(source, opts, torch.device("cuda:0"), parse_max_memory(opts.max_memory)).model
    placed = devices_of(model)
    assert {"cuda:0", "cuda:1"} <= set(placed), placed
    llm = next(model.mllm.model.language_model.parameters()).device
    decoder = model.grounding.sam.mask_decoder.conv_s0.weight.device
    assert llm != decoder  # the [SEG] -> SAM-2 path crosses devices
    split = predict(
        _cfg(
            "ckpt=random",
            "model=tiny",
            output=str(tmp_path / "split"),
            device_map="sequential",
            max_memory=budget,
            **common,
        )
    )
    assert split["ok"] == one["ok"] == 4
    a, b = _masks(tmp_path / "one"), _masks(tmp_path / "split")
    agreement = [float((a[k] == b[k]).mean()) for k in a]
    assert min(agreement) > 0.999, agreement
    first = {r["id"]: r["mean_logit"] for r in _results(tmp_path / "one")}
    assert all(
        r["mean_logit"] == pytest.approx(first[r["id"]], rel=1e-3, abs=1e-4) for r in _results(tmp_path / "split")
    )


@gpu
@multigpu
def test_data_parallel_over_two_gpus(tmp_path):
    images = _images(tmp_path / "in", 6)
    one = predict(_cfg("ckpt=random", "model=tiny", input=str(images), output=str(tmp_path / "one"), batch_size=2))
    proc = _cli(
        "ckpt=random", "model=tiny", f"input={images}", f"output={tmp_path / 'two'}", "devices=2", "batch_size=2"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["id"] for r in _results(tmp_path / "two")] == [f"im{i}" for i in range(6)]
    a, b = _masks(tmp_path / "one"), _masks(tmp_path / "two")
    assert min(float((a[k] == b[k]).mean()) for k in a) > 0.999
    assert one["ok"] == 6


@gpu
def test_deepspeed_checkpoint_directory_predicts_like_the_run(tmp_path):
    from vseg.training.run import run as train

    from conftest import tiny_cfg

    run_dir = tmp_path / "run"
    train(
        tiny_cfg(
            [
                f"run_dir={run_dir}",
                "trainer=gpu",
                "strategy=zero2",
                "trainer.devices=1",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "optim.lr=1e-2",
            ]
        )
    )
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir(), list((run_dir / "checkpoints").iterdir())
    images = _images(tmp_path / "in", 3)
    a = predict(_cfg(f"ckpt={ckpt}", input=str(images), output=str(tmp_path / "ds"), dtype="float32"))
    b = predict(_cfg(f"ckpt={run_dir}", input=str(images), output=str(tmp_path / "run_out"), dtype="float32"))
    assert a["ok"] == b["ok"] == 3 and a["ckpt"].startswith("deepspeed:")
    ma, mb = _masks(tmp_path / "ds"), _masks(tmp_path / "run_out")
    assert all(np.array_equal(ma[k], mb[k]) for k in ma)
