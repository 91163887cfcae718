"""feature_cache: the frozen encoders' outputs on disk, written once and read back exactly; a changed model or
size lands elsewhere; a damaged entry is re-encoded, never used; augmented variants are fixed per image."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vseg.artifacts.feature_store import FeatureStore, content_key
from vseg.config import ConfigError, StrategyConfig, validate
from vseg.training.feature_cache import FrozenFeatures, model_identity
from vseg.training.module import Sa2VAModule

from conftest import random_batch, tiny_cfg


def _keys(batch: dict) -> None:
    """The content keys the dataset adds (this batch comes straight from the processor)."""
    pixels, tiles = batch["mllm_inputs"]["pixel_values"], len(batch["ids"])
    per = pixels.shape[0] // tiles
    batch["content_keys"] = [
        {
            "sam": content_key(batch["sam_pixel_values"][i]),
            "vision": content_key(pixels[i * per : (i + 1) * per]),
            "tiles": per,
        }
        for i in range(tiles)
    ]


def _cache_cfg(tmp_path, *extra):
    return tiny_cfg(["feature_cache.enabled=true", f"feature_cache.dir={tmp_path / 'cache'}", *extra])


def _losses(module: Sa2VAModule, batch: dict) -> list[float]:
    _, sums = module._forward(batch)
    return [float(sums.mask_bce), float(sums.mask_dice), float(sums.llm)]


def test_written_then_read_gives_the_losses_of_no_cache_and_skips_the_encoders(built, tmp_path):
    model, _, processor = built
    cfg = _cache_cfg(tmp_path)
    batch = random_batch(processor, sizes=((60, 72), (50, 40), (60, 72)), seed=5)
    batch["sam_pixel_values"][2] = batch["sam_pixel_values"][0]  # the third sample shows the first's image
    batch["mllm_inputs"]["pixel_values"][2] = batch["mllm_inputs"]["pixel_values"][0]
    _keys(batch)
    plain = Sa2VAModule(model, tiny_cfg())
    cached = Sa2VAModule(model, cfg)
    assert set(cached.feature_cache.stores) == {"sam", "vision"}
    with torch.no_grad():
        want = _losses(plain, batch)
        first = _losses(cached, batch)  # encodes and writes
        calls = []
        sam_encode, vision_encode = model.grounding.encode_backbone, model.family.frozen_image_features
        model.grounding.encode_backbone = lambda *a: calls.append("sam") or sam_encode(*a)
        type(model.family).frozen_image_features = lambda self, *a: calls.append("vision") or vision_encode(*a)
        try:
            second = _losses(Sa2VAModule(model, cfg), batch)  # a new process's view: everything from disk
        finally:
            del model.grounding.encode_backbone
            type(model.family).frozen_image_features = vision_encode.__func__
    assert calls == []  # neither frozen encoder ran
    assert first == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert second == pytest.approx(want, rel=1e-5, abs=1e-6)
    stats = {p: s.stats for p, s in cached.feature_cache.stores.items()}
    # three samples, two distinct images: each encoded and written once
    assert all((s.misses, s.written, s.hits) == (2, 2, 0) for s in stats.values())
    assert all(len(list(s.dir.glob("*/*.safetensors"))) == 2 for s in cached.feature_cache.stores.values())


def test_a_changed_model_or_size_lands_in_another_directory(tmp_path):
    base = _cache_cfg(tmp_path)
    dirs = {p: FrozenFeatures.from_config(base).stores[p].dir for p in ("sam", "vision")}
    assert dirs == {p: FrozenFeatures.from_config(_cache_cfg(tmp_path)).stores[p].dir for p in dirs}  # stable
    other_dtype = _cache_cfg(tmp_path, "model.dtype=bfloat16")
    other_seed = _cache_cfg(tmp_path, "seed=7")  # a random-init base drawn from another seed
    for cfg in (other_dtype, other_seed):
        stores = FrozenFeatures.from_config(cfg).stores
        assert all(stores[p].dir != dirs[p] for p in dirs)
    sam_size = _cache_cfg(tmp_path, "model.sam2.prompt_encoder_config.image_size=256")
    assert model_identity(sam_size, "sam") != model_identity(base, "sam")
    tile_size = _cache_cfg(tmp_path, "model.vision.image_size=[112,112]")
    assert model_identity(tile_size, "vision") != model_identity(base, "vision")
    # a folder's weights: their files identify them; replacing one changes the fingerprint
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, path=str(folder)))
    before = FrozenFeatures.from_config(cfg).stores["sam"].dir
    (folder / "model.safetensors").write_bytes(b"y" * 11)
    assert FrozenFeatures.from_config(cfg).stores["sam"].dir != before
    # the input size changes the key itself: the key is the hash of the encoder's input
    assert content_key(torch.zeros(3, 64, 64, dtype=torch.uint8)) != content_key(
        torch.zeros(3, 32, 32, dtype=torch.uint8)
    )


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "other_key"])
def test_a_damaged_entry_is_detected_removed_and_encoded_again(tmp_path, damage):
    store = FeatureStore(tmp_path, "sam", {"m": 1})
    tensors = [torch.randn(4, 8, 8), torch.randn(4, 4, 4).bfloat16()]
    assert store.write("ab" * 20, tensors)
    path = store.path("ab" * 20)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) - 100])
    elif damage == "flip":
        raw[-7] ^= 0xFF
        path.write_bytes(raw)
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:  # another entry's file under this name
        store.write("cd" * 20, [t + 1 for t in tensors])
        path.write_bytes(store.path("cd" * 20).read_bytes())
    fresh = FeatureStore(tmp_path, "sam", {"m": 1})  # another process: nothing verified yet
    calls = []

    def encode(indices):
        calls.append(indices)
        return [tensors for _ in indices]

    got = FrozenFeatures.lookup(fresh, ["ab" * 20], encode, agree=lambda flag: flag)
    assert calls == [[0]] and fresh.stats.corrupt == 1 and fresh.stats.written == 1
    assert all(torch.equal(a, b) for a, b in zip(got[0], tensors, strict=True))
    again = FeatureStore(tmp_path, "sam", {"m": 1}).read("ab" * 20)  # rewritten whole
    assert again is not None and all(torch.equal(a, b) for a, b in zip(again, tensors, strict=True))


def test_entries_are_read_where_the_loader_pins_the_batch_and_nowhere_else(tmp_path, monkeypatch):
    """A worker names the entries on disk (a pickled `StoredEntry`, no tensors); DataLoader's pinning reads each
    through this process's store, page-locked; a batch that was not pinned is read by the step, counted once."""
    import pickle

    from torch.utils.data._utils.pin_memory import pin_memory

    from vseg.artifacts.feature_store import StoredEntry

    store = FeatureStore(tmp_path, "sam", {"m": 1})
    tensors = [torch.randn(4, 8, 8), torch.randn(2, 4, 4).bfloat16()]
    store.write("ab" * 20, tensors)
    worker_copy = pickle.loads(pickle.dumps(store))  # what a loader's worker holds
    named = worker_copy.entry("ab" * 20)
    assert isinstance(named, StoredEntry) and worker_copy.entry("cd" * 20) is None
    sent = pickle.loads(pickle.dumps([{"sam": named}, {"sam": None}]))  # the worker's batch, as received

    reads: list[tuple[str, bool]] = []
    real_read = FeatureStore.read

    def read(self, key, pin=False):
        reads.append((key, pin))
        return real_read(self, key)  # (page-locked memory needs a GPU; the GPU test below checks it)

    monkeypatch.setattr(FeatureStore, "read", read)
    pinned = pin_memory(sent)
    assert reads == [("ab" * 20, True)] and pinned[1] == {"sam": None}
    assert all(torch.equal(a, b) for a, b in zip(pinned[0]["sam"], tensors, strict=True))
    assert pin_memory([StoredEntry(str(tmp_path / "elsewhere"), "ab" * 20)])[0].key == "ab" * 20  # no store: left

    reads.clear()  # unpinned (a CPU run): the step reads the named entry itself, once
    got = FrozenFeatures.lookup(store, ["ab" * 20], lambda i: pytest.fail("encoded"), lambda f: f, [sent[0]["sam"]])
    assert reads == [("ab" * 20, False)] and store.stats.hits == 1
    assert all(torch.equal(a, b) for a, b in zip(got[0], tensors, strict=True))
    got = FrozenFeatures.lookup(store, ["ab" * 20], lambda i: pytest.fail("encoded"), lambda f: f, [pinned[0]["sam"]])
    assert reads == [("ab" * 20, False)] and store.stats.hits == 2  # already read by the pinning: not again


@pytest.mark.gpu
def test_a_pinned_entry_is_page_locked_and_exact(tmp_path):
    from torch.utils.data._utils.pin_memory import pin_memory

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    store = FeatureStore(tmp_path, "sam", {"m": 1})
    tensors = [torch.randn(4, 8, 8), torch.randn(2, 4, 4).bfloat16()]
    store.write("ab" * 20, tensors)
    pinned = pin_memory([{"sam": store.entry("ab" * 20)}])[0]["sam"]
    assert all(t.is_pinned() and torch.equal(t, u) for t, u in zip(pinned, tensors, strict=True))


def test_a_rank_without_misses_joins_the_encoder_when_another_rank_encodes(tmp_path):
    """ZeRO-3: the partitioned encoder gathers from every rank, so all run it or none does."""
    store = FeatureStore(tmp_path, "sam", {"m": 1})
    store.write("ab" * 20, [torch.ones(2)])
    calls = []

    def encode(indices):
        calls.append(indices)
        return [[torch.zeros(2)] for _ in indices]

    got = FrozenFeatures.lookup(store, ["ab" * 20], encode, agree=lambda flag: True)  # another rank misses
    assert calls == [[0]] and torch.equal(got[0][0], torch.ones(2))  # ran once, its result unused
    FrozenFeatures.lookup(store, ["ab" * 20], encode, agree=lambda flag: flag)  # nobody misses: not called
    assert calls == [[0]] and store.stats.written == 1


def test_a_busy_entry_is_used_but_not_written_twice(tmp_path):
    store = FeatureStore(tmp_path, "sam", {"m": 1})
    path = store.path("ef" * 20)
    path.parent.mkdir(parents=True)
    path.with_name(path.name + ".lock").write_text("12345")  # another process is writing it
    assert not store.write("ef" * 20, [torch.ones(1)]) and store.stats.busy == 1 and not path.exists()


def test_config_rules():
    with pytest.raises(ConfigError, match="needs data.augment.variants=N"):
        tiny_cfg(["feature_cache.enabled=true", "data.augment.enabled=true"])
    with pytest.raises(ConfigError, match="pick one"):
        tiny_cfg(["feature_cache.enabled=true", "model.sam_feature_cache=gpu"])
    with pytest.raises(ConfigError, match="feature_cache.parts"):
        tiny_cfg(["feature_cache.parts=[sam,llm]"])
    cfg = tiny_cfg(["feature_cache.enabled=true", "data.augment.enabled=true", "data.augment.variants=3"])
    validate(dataclasses.replace(cfg, strategy=StrategyConfig(name="zero3", stage=3)), cuda_available=True)


def test_fixed_variants_give_each_image_at_most_n_encoder_inputs(built):
    from vseg.data.dataset import SegmentationDataset, expand
    from vseg.data.sources import read_records

    _, _, processor = built
    keys = {}
    for variants in (0, 2):
        augment = ["data.augment.enabled=true", "data.augment.brightness=0.3", f"data.augment.variants={variants}"]
        cfg = tiny_cfg(["data.num_samples=3", *augment])
        items = expand(read_records(cfg.data), cfg.data.objects)
        dataset = SegmentationDataset(items, processor, cfg.data, repeats=4, train=True, content_keys=True)
        seen: dict[str, set[str]] = {}
        for epoch in range(3):
            dataset.set_epoch(epoch)
            for i in range(len(dataset)):
                sample = dataset[i]
                seen.setdefault(sample["image_id"], set()).add(sample["content_keys"]["sam"])
        keys[variants] = seen
    assert all(len(k) == 2 for k in keys[2].values())  # 12 visits per image, exactly its two variants
    assert all(len(k) > 2 for k in keys[0].values())  # fresh draws: (nearly) every visit differs
    # the variant's pixels do not depend on the epoch or the visit: visit 0 of epoch 5 shows one of them
    dataset.set_epoch(5)
    assert dataset[0]["content_keys"]["sam"] in keys[2][dataset[0]["image_id"]]


@pytest.mark.slow
def test_training_reads_the_cache_and_ends_where_training_without_it_ends(tmp_path):
    """No cache, then a `vseg cache` pass and a run that reads every feature from disk, then a run that fills a
    fresh cache on first visit: the same trained weights each time."""
    from vseg.training.cache_pass import fill
    from vseg.training.run import run

    base = ["data.num_samples=5", "data.repeats=3", "trainer.max_steps=4", "trainer.val_check_interval=4"]
    torch.manual_seed(0)
    plain = run(tiny_cfg([*base, f"run_dir={tmp_path / 'none'}"]))
    shared = tmp_path / "shared"
    cfg = tiny_cfg([*base, f"run_dir={tmp_path / 'read'}", "feature_cache.enabled=true", f"feature_cache.dir={shared}"])
    filled = fill(cfg, progress=False)
    assert all(s.stats.written == 4 for s in filled.stores.values())  # 4 training images
    torch.manual_seed(0)
    read = run(cfg)
    torch.manual_seed(0)
    first_visit = run(tiny_cfg([*base, f"run_dir={tmp_path / 'fill'}", "feature_cache.enabled=true"]))
    # every feature read from disk (a batch holding one image twice reads it once)
    assert all(s.stats.misses == 0 and s.stats.hits >= 4 for s in read.module.feature_cache.stores.values())
    fresh = first_visit.module.feature_cache.stores
    assert all(s.stats.misses == 4 and s.stats.written == 4 for s in fresh.values())
    assert all(s.dir.parent == tmp_path / "fill" / "feature_cache" for s in fresh.values())
    want = {n: p for n, p in plain.module.named_parameters() if p.requires_grad}
    for result in (read, first_visit):
        got = {n: p for n, p in result.module.named_parameters() if p.requires_grad}
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def _train_ddp(run_dir, extra: list[str], script: str = "train.py"):
    import subprocess
    import sys

    from conftest import ROOT

    args = [
        "strategy=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.num_samples=7",
        "data.repeats=3",
        "data.batch_size=2",
        "trainer.max_steps=3",
        "trainer.val_check_interval=null",
        "trainer.check_val_every_n_epoch=100",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    proc = subprocess.run(
        [sys.executable, script, f"run_dir={run_dir}", *args, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_ddp_processes_share_one_cache_directory(tmp_path):
    """gloo DDP, two ranks on one node: both fill one directory (one writer per entry), a second run reads
    every feature from it, and both end with the weights of the run without a cache."""
    from safetensors.torch import load_file

    shared = tmp_path / "cache"
    cache = ["feature_cache.enabled=true", f"feature_cache.dir={shared}"]
    _train_ddp(tmp_path / "none", [])
    filling = _train_ddp(tmp_path / "fill", cache)
    reading = _train_ddp(tmp_path / "read", cache)
    assert filling.count("feature cache: sam:") == 2 and reading.count("feature cache: sam:") == 2  # both ranks
    assert reading.count("sam: 0 read") == 0 and reading.count(" 0 encoded (0 written here") == 4  # 2 ranks x 2 parts
    for part in ("sam", "vision"):
        (directory,) = shared.glob(f"{part}-*")
        entries = list(directory.glob("*/*.safetensors"))
        assert 1 <= len(entries) <= 6  # at most the 6 training images, each stored once
        assert not list(directory.glob("*/*.lock")) and not list(directory.glob("*/.*tmp*"))
    want = load_file(tmp_path / "none" / "weights" / "trainable.safetensors")
    for run in ("fill", "read"):
        got = load_file(tmp_path / run / "weights" / "trainable.safetensors")
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=f"{run}: {name}")


@pytest.mark.slow
def test_zero3_ranks_agree_and_skip_the_partitioned_encoders_when_cached(tmp_path):
    """Two gloo ranks of DeepSpeed ZeRO-3 on the CPU (tests/workers/zero3_feature_cache.py)."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    pytest.importorskip("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    worker = ROOT / "tests" / "workers" / "zero3_feature_cache.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(port), str(rank), str(tmp_path / "cache")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    reports = {}
    try:
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=500)  # a rank left alone in a gather would hang: the timeout fails it
            lines = [line for line in out.splitlines() if line.startswith("REPORT ")]
            assert proc.returncode == 0 and lines, out[-4000:]
            reports[rank] = json.loads(lines[-1][len("REPORT ") :])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, r in reports.items():
        calls = [p["calls"] for p in r["phases"]]
        assert calls[0] == {"sam": 1, "vision": 1}  # nothing on disk: every rank encodes
        # rank 0 has all of batch A on disk but rank 1 misses batch B: rank 0 still joins the encoders once
        assert calls[1] == {"sam": 1, "vision": 1}
        assert calls[2] == {"sam": 0, "vision": 0} and r["step"]["calls"] == {"sam": 0, "vision": 0}
        # bf16 partitioned model vs the fp32 unpartitioned one on the same batch (observed ~3e-5 apart; the
        # two batches' losses differ by >= 4e-4)
        first, second, third = (p["loss"] for p in r["phases"])
        assert first == pytest.approx(r["want"]["A"], rel=2e-4) and third == first
        assert second == pytest.approx(r["want"]["A" if rank == 0 else "B"], rel=2e-4)
        assert r["step"]["loss"] == pytest.approx(first)
    for part in ("sam", "vision"):
        (directory,) = (tmp_path / "cache").glob(f"{part}-*")
        assert len(list(directory.glob("*/*.safetensors"))) == 6  # batches A of both ranks + rank 1's batch B


def test_plan_counts_the_vision_tiles_of_the_configured_image_size():
    """Several tiles per image: the vision part holds what the processor cuts from a `data.image_size` square
    (not the worst case of `max_tiles`); images of their own sizes get the worst case, said to be a bound."""
    from PIL import Image

    from vseg.model.preprocess import internvl_tiles
    from vseg.planner.disk import cache_size

    one_tile = cache_size(tiny_cfg(["feature_cache.enabled=true"]), 4).per_image["vision"]
    for side in (40, 128, 300):
        cfg = tiny_cfg(["feature_cache.enabled=true", "model.max_tiles=12", f"data.image_size={side}"])
        tile = cfg.model.vision["image_size"][0]
        tiles = internvl_tiles(Image.new("RGB", (side, side)), tile, max_tiles=12).shape[0]
        size = cache_size(cfg, 4)
        assert size.exact and size.per_image["vision"] == tiles * one_tile, side
    assert tiles > 1  # the largest side cuts a grid (+ thumbnail)
    own_sizes = dataclasses.replace(cfg.data, image_size=None)  # as a folder source without data.image_size
    bound = cache_size(dataclasses.replace(cfg, data=own_sizes), 4)
    assert not bound.exact and bound.per_image["vision"] == 13 * one_tile
    assert "up to vision" not in bound.line(True) and "up to sam " in bound.line(True)


def test_plan_says_how_much_host_ram_the_loaders_cached_batches_hold():
    """8 workers x 2 prefetched batches (+ the one in use) of micro-batch 32 x ~44 MB held 27 GB of RSS on the
    H200; the plan line says so, with the field that lowers it, and stays quiet when it is small."""
    from vseg.planner.disk import cache_size

    per_image = sum(cache_size(tiny_cfg(["feature_cache.enabled=true"]), 1).per_image.values())
    for workers, batch in ((8, 32), (0, 2)):
        cfg = tiny_cfg(["feature_cache.enabled=true", f"data.num_workers={workers}", f"data.batch_size={batch}"])
        size = cache_size(cfg, 10)
        assert size.in_flight == per_image * batch * (2 * workers + 1 if workers else 1)
    big = dataclasses.replace(size, per_image={"sam": 44 * 2**20}, batch_size=32, batches_in_flight=17)
    line = big.line(True)
    assert "hold copies of up to 23.4 GB of entries in page-locked host RAM per rank (17 batches of 32: fewer" in line
    assert "host RAM" not in big.line(False) and "host RAM" not in size.line(True)


def test_plan_reports_the_disk_size_that_entries_really_take(built, tmp_path, capsys):
    from vseg.planner.disk import cache_size
    from vseg.planner.plan import main

    model, _, processor = built
    cfg = _cache_cfg(tmp_path)
    batch = random_batch(processor, sizes=((60, 72),), seed=2)
    _keys(batch)
    cache = FrozenFeatures.from_config(cfg)
    with torch.no_grad():
        cache.inputs(batch, model, agree=lambda flag: flag)
    size = cache_size(cfg, 1)
    for part, store in cache.stores.items():
        (entry,) = store.dir.glob("*/*.safetensors")
        tensors = store.read(entry.stem)
        assert size.per_image[part] == sum(t.numel() * t.element_size() for t in tensors)
        assert 0 < entry.stat().st_size - size.per_image[part] < 1024  # + the safetensors header
    variants = tiny_cfg(["feature_cache.enabled=true", "data.augment.enabled=true", "data.augment.variants=3"])
    assert cache_size(variants, 10).total == 10 * 3 * sum(size.per_image.values())
    assert main(["model=tiny", "gpu_memory=8GB", "data.num_samples=9", "data.augment.variants=2"]) == 0
    out = capsys.readouterr().out
    assert "feature cache on disk (off; feature_cache.enabled=true to use it): sam " in out
    assert "per image x 8 training images = " in out  # 9 synthetic images, one held out; no augmentation
