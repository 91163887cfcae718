"""vseg serve with compile=true: CUDA graphs refused on the CPU, the warm-up runs on the replica's worker thread
before /health says ready, compiled masks equal the eager model's; the model call's parts and the probability
map computed only when asked; SAM-2's resize beside the tiles gives the same features."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import vseg.serve.service as service_module
from vseg.cli import main as vseg_main
from vseg.config import ConfigError
from vseg.data.synthetic import generate_vessels
from vseg.inference.inputs import DEFAULT_PROMPT
from vseg.inference.predictor import Predictor
from vseg.serve import config_from_args
from vseg.serve.prepare import ImageSource, encode
from vseg.serve.service import Service

BASE = ["ckpt=random", "model=tiny", "port=9123"]


def test_cuda_graph_mode_is_refused_on_the_cpu_and_warmup_sizes_are_checked():
    with pytest.raises(ConfigError, match="needs a GPU"):
        config_from_args([*BASE, "device=cpu", "compile=true", "compile_mode=reduce-overhead"])
    assert vseg_main(["serve", *BASE, "device=cpu", "compile=true", "compile_mode=reduce-overhead"]) == 2
    if not torch.cuda.is_available():  # device=auto resolves to the CPU here: refused when the service is built
        cfg = config_from_args([*BASE, "compile=true", "compile_mode=reduce-overhead"])
        with pytest.raises(ConfigError, match="needs a GPU.*compile_mode=default"):
            Service(cfg)
    with pytest.raises(ConfigError, match="compile_mode='fast'"):
        config_from_args([*BASE, "compile=true", "compile_mode=fast"])
    with pytest.raises(ConfigError, match="warmup_batch_sizes"):
        config_from_args([*BASE, "max_batch_size=4", "warmup_batch_sizes=[1,8]"])
    assert config_from_args([*BASE, "max_batch_size=4"]).warmup_sizes() == []  # eager: no warm-up by default
    assert config_from_args([*BASE, "max_batch_size=4", "compile=true"]).warmup_sizes() == [1, 4]
    assert config_from_args([*BASE, "compile=true", "warmup_batch_sizes=[2,1,2]"]).warmup_sizes() == [1, 2]
    # CUDA graphs: batches are padded to a warmed size, so the powers of two by default and max_batch_size always
    graphs = [*BASE, "device=cuda:0", "compile=true", "compile_mode=reduce-overhead", "max_batch_size=12"]
    assert config_from_args(graphs).warmup_sizes() == [1, 2, 4, 8, 12] and config_from_args(graphs).pads_batches()
    with pytest.raises(ConfigError, match=r"must include max_batch_size=12"):
        config_from_args([*graphs, "warmup_batch_sizes=[1,8]"])
    assert config_from_args([*graphs, "warmup_batch_sizes=[4,12]"]).warmup_sizes() == [4, 12]


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _serve(service: Service, images: list[np.ndarray], probability: bool) -> list:
    futures = [
        service.prepare_segment(
            ImageSource(f"images[{i}]", raw=_png(im)), "teacher_forced", DEFAULT_PROMPT, probability
        )
        for i, im in enumerate(images)
    ]
    return [f.result(timeout=300) for f in futures]


def test_warm_up_runs_on_the_worker_before_ready_and_probability_only_when_asked(monkeypatch):
    """The warm-up (here eager, batch sizes 1 and 2) runs on the replica's worker thread, and the service stays
    "starting" (/health 503, stage "warming up") until it is done; results carry the model call's parts."""
    release, seen = threading.Event(), []
    real = service_module.warm_up

    def warm_up(predictor, sizes, side=512):
        seen.append((threading.current_thread().name, list(sizes)))
        assert release.wait(120)
        return real(predictor, sizes, side=96)

    monkeypatch.setattr(service_module, "warm_up", warm_up)
    cfg = config_from_args([*BASE, "device=cpu", "max_batch_size=2", "warmup_batch_sizes=[2,1]"])
    service = Service(cfg)
    loading = service.load_in_background()
    try:
        deadline = time.time() + 120
        while not seen and time.time() < deadline:
            time.sleep(0.05)
        assert seen == [("vseg-replica0", [1, 2])]  # on the worker thread that will run the model
        assert (service.state, service.stage) == ("starting", "warming up")  # /health: 503 until warmed up
        release.set()
        loading.join(120)
        assert service.state == "ready", service.error
        assert set(service.info()["warmup_seconds"]["replica0"]) == {1, 2}
        images = [generate_vessels(seed=440 + i, size=64 + 8 * i, style="angiogram")[0] for i in range(2)]
        expected = service.replicas[0].predictor.predict(images)
        for outcome, want in zip(_serve(service, images, False), expected, strict=True):
            assert (outcome.prediction.mask == want.mask).all()
            assert outcome.prediction.probability is None  # not asked for: not computed
            assert {"collate_ms", "copy_ms", "forward_ms", "finish_ms"} <= set(outcome.parts)
            # copy, forward and finish are inside the worker's call; collating may have run ahead on the stager
            in_call = sum(v for k, v in outcome.parts.items() if k != "collate_ms")
            assert in_call <= outcome.model_ms + 1 and outcome.parts["collate_ms"] >= 0
        (asked,) = _serve(service, images[:1], True)
        probability = asked.prediction.probability
        assert probability is not None and ((probability > cfg.threshold) == expected[0].mask).all()
    finally:
        release.set()
        service.close()


@pytest.mark.slow
def test_compiled_server_serves_the_eager_masks(monkeypatch):
    """compile=true compile_mode=default on the CPU (traced with "aot_eager": inductor's C++ builds take minutes on
    two cores), warmed up at batch 1 and 2 on start-up: the served masks are the eager model's (~1 min here)."""
    import vseg.model.compile as C

    monkeypatch.setattr(C, "BACKEND", "aot_eager")
    cfg = config_from_args([*BASE, "device=cpu", "compile=true", "compile_mode=default", "max_batch_size=2",
                            "batch_timeout_ms=2000"])  # fmt: skip
    service = Service(cfg)
    service.load()
    try:
        assert service.state == "ready", service.error
        assert set(service.info()["warmup_seconds"]["replica0"]) == {1, 2}
        images = [generate_vessels(seed=430 + i, size=64 + 8 * i, style="angiogram")[0] for i in range(2)]
        eager = Predictor.load("random", model="tiny", device="cpu").predict(images)
        for outcome, want in zip(_serve(service, images, False), eager, strict=True):
            assert (outcome.prediction.mask == want.mask).all()
            assert outcome.prediction.mean_logit == pytest.approx(want.mean_logit, rel=1e-4, abs=1e-4)
    finally:
        service.close()


def test_sam_resize_beside_the_tiles_gives_the_same_features():
    predictor = Predictor.load("random", model="tiny", device="cpu")
    with ThreadPoolExecutor(2) as pool:
        for seed, (h, w) in enumerate([(64, 64), (584, 565), (97, 301)]):
            rng = np.random.default_rng(seed)
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            alone = encode(predictor.processor, image, DEFAULT_PROMPT, predictor.answer_text)
            beside = encode(predictor.processor, image, DEFAULT_PROMPT, predictor.answer_text, pool)
            assert torch.equal(alone["sam_pixel_values"], beside["sam_pixel_values"])
            assert torch.equal(alone["input_ids"], beside["input_ids"])
            for key, value in alone["mllm_inputs"].items():
                assert torch.equal(value, beside["mllm_inputs"][key])


def test_sam_resize_is_split_off_only_while_cores_are_idle():
    import os

    service = Service(config_from_args([*BASE, "device=cpu"]))
    try:
        service.batcher.announce()  # one request in preparation: a second core helps it
        assert service._resize_pool() is service.resize_pool
        service.batcher.announce(max(1, (os.cpu_count() or 1) // 2))  # more than one per two cores: each alone
        assert service._resize_pool() is None
    finally:
        service.close()


@pytest.mark.gpu
def test_a_cuda_replica_collates_into_pinned_memory_and_serves_the_same_masks():
    """The worker stacks a CUDA batch's images into page-locked memory (`processor.stack(pin=True)`): same
    pixels, pinned, and the served masks equal `Predictor.predict`'s."""
    from vseg.inference.inputs import collate
    from vseg.model.processor import stack
    from vseg.serve.batcher import Replica, Task

    images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(3)]
    pinned = stack(images, pin=True)
    assert pinned.is_pinned() and torch.equal(pinned, torch.stack(images))
    predictor = Predictor.load("random", model="tiny", device="cuda:0")
    arrays = [generate_vessels(seed=450 + i, size=96)[0] for i in range(3)]
    samples = [encode(predictor.processor, a, DEFAULT_PROMPT, predictor.answer_text) for a in arrays]
    assert collate(predictor.processor, samples, pin=True)["sam_pixel_values"].is_pinned()
    tasks = [Task("segment", "teacher_forced", a, DEFAULT_PROMPT, sample=s, encoded_by=predictor.processor)
             for a, s in zip(arrays, samples, strict=True)]  # fmt: skip
    served = Replica._predict(predictor, tasks)
    expected = predictor.predict(arrays, batch_size=3)
    for got, want in zip(served, expected, strict=True):
        assert np.array_equal(got.mask, want.mask)
