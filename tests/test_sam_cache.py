"""model.sam_feature_cache: the frozen SAM-2 backbone runs once per image and training is unchanged by it."""

from __future__ import annotations

import pytest
import torch

from vseg.config import ConfigError
from vseg.model.grounding import BackboneCache
from vseg.training.run import run

from conftest import random_batch, tiny_cfg


@pytest.mark.parametrize("where", ["gpu", "cpu"])  # "gpu" keeps features where they were computed (CPU here)
def test_cache_computes_each_image_once_and_returns_the_encoder_output(built, where):
    model, _, processor = built
    grounding = model.grounding
    batch = random_batch(processor, sizes=((60, 72), (50, 40), (64, 64)), seed=3)
    pixels = batch["sam_pixel_values"]
    with torch.no_grad():
        want = grounding.encode_backbone(pixels)
    calls = []
    original = grounding.encode_backbone

    def counting(x):
        calls.append(x.shape[0])
        return original(x)

    grounding.encode_backbone = counting
    cache = BackboneCache(where)
    keys = ["a", "b", "a"]  # the same image twice in one batch is encoded once
    got = cache.features(keys, torch.stack([pixels[0], pixels[1], pixels[0]]), grounding)
    assert calls == [2] and (cache.hits, cache.misses, len(cache)) == (1, 2, 2)
    for level_got, level_want in zip(got, want, strict=True):
        torch.testing.assert_close(level_got[0], level_want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(level_got[1], level_want[1], rtol=1e-5, atol=1e-5)
        assert torch.equal(level_got[2], level_got[0])
    got = cache.features(["b", "c"], torch.stack([pixels[1], pixels[2]]), grounding)
    assert calls == [2, 1] and (cache.hits, cache.misses) == (2, 3)  # only "c" was new
    for level_got, level_want in zip(got, want, strict=True):
        torch.testing.assert_close(level_got[1], level_want[2], rtol=1e-5, atol=1e-5)
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in want) and not got[0].requires_grad
    with pytest.raises(ValueError, match="2 keys for 3 images"):
        cache.features(["a", "b"], pixels, grounding)


@pytest.mark.slow
def test_training_with_the_cache_matches_training_without_it(tmp_path):
    """4 images x 3 repeats: the cached run computes each image's features once and ends with the same weights."""
    base = ["data.num_samples=5", "data.repeats=3", "trainer.max_steps=6", "trainer.val_check_interval=6"]
    results = {}
    for where in ("none", "gpu"):
        torch.manual_seed(0)
        cfg = tiny_cfg([*base, f"run_dir={tmp_path / where}", f"model.sam_feature_cache={where}"])
        results[where] = run(cfg)
    cache = results["gpu"].module.sam_cache
    assert results["none"].module.sam_cache is None
    assert len(cache) == 4 and cache.misses == 4 and cache.hits == 6 * 2 - 4  # 6 steps x batch 2, 4 train images
    plain = {n: p for n, p in results["none"].module.named_parameters() if p.requires_grad}
    cached = {n: p for n, p in results["gpu"].module.named_parameters() if p.requires_grad}
    assert plain.keys() == cached.keys()
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)
    assert results["gpu"].metrics["val/dice"] == pytest.approx(results["none"].metrics["val/dice"], abs=1e-4)


def test_cache_is_refused_with_augmentation_and_with_zero3():
    with pytest.raises(ConfigError, match="needs data.augment.enabled=false"):
        tiny_cfg(["model.sam_feature_cache=gpu", "data.augment.enabled=true"])
    with pytest.raises(ConfigError, match="not supported with strategy=zero3"):
        tiny_cfg(["model.sam_feature_cache=cpu", "strategy=zero3"])
    with pytest.raises(ConfigError, match="none\\|gpu\\|cpu"):
        tiny_cfg(["model.sam_feature_cache=disk"])


def test_objects_of_one_image_share_one_cache_entry(built, tmp_path):
    """data.objects=per_object: every object of an image is a sample, and they all reuse that image's features."""
    from test_sources import _coco

    from vseg.config import DataConfig
    from vseg.data.dataset import SegmentationDataset, expand
    from vseg.data.sources import read_records

    model, _, processor = built
    path, _, _ = _coco(tmp_path)
    data = DataConfig(source="coco", annotations=str(path), objects="per_object", image_size=64)
    data.augment.enabled = False
    items = expand(read_records(data), data.objects)
    dataset = SegmentationDataset(items, processor, data, train=True)
    batch = processor.collate([dataset[i] for i in range(len(dataset))])
    assert len(set(batch["ids"])) == len(items) > len(set(batch["image_ids"]))  # image p holds two objects
    cache = BackboneCache("gpu")
    cache.features(batch["image_ids"], batch["sam_pixel_values"], model.grounding)
    assert len(cache) == len(set(batch["image_ids"])) and cache.misses == len(cache)


def test_cache_size_is_known_and_a_cache_that_cannot_fit_is_refused(built, monkeypatch):
    import vseg.planner.startup as S

    model, _, processor = built
    batch = random_batch(processor, sizes=((60, 72),), seed=1)
    cache = BackboneCache("gpu")
    cache.features(["x"], batch["sam_pixel_values"], model.grounding)
    cfg = tiny_cfg(["model.sam_feature_cache=gpu"])
    assert S.sam_cache_bytes(cfg.model, 1) == cache.nbytes  # the estimate is what one image really holds
    assert S.check_sam_cache(cfg, 10) == 10 * cache.nbytes  # no GPU and no plan.gpu_memory: nothing to judge
    # plan.gpu_memory stands for the GPU: the estimate of the setting + the cache must fit it
    cfg = tiny_cfg(["model.sam_feature_cache=gpu", "plan.gpu_memory=3GB"])
    S.check_sam_cache(cfg, 10)
    with pytest.raises(ConfigError, match="sam_feature_cache=gpu: the cache grows to 2000000 training images"):
        S.check_sam_cache(cfg, 2_000_000)
    cfg = tiny_cfg(["model.sam_feature_cache=cpu"])
    monkeypatch.setattr(S, "host_available", lambda: 2.0**30)
    S.check_sam_cache(cfg, 10)
    with pytest.raises(ConfigError, match="sam_feature_cache=cpu: 1 process"):
        S.check_sam_cache(cfg, 2_000_000)
