"""Several targets per image share one vision pass: the vision encoder (InternVL: tower + projector; Qwen-VL: the
visual model with its mergers) runs once per image, and every target's row gets that image's embeddings. The
masks and answers equal those of the path that runs the vision encoder for every row, on tiny InternVL (images
of different tile counts), Qwen2.5-VL and Qwen3-VL (deepstack) models."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vseg.artifacts.sources import preset
from vseg.data.synthetic import generate_vessels
from vseg.inference.predictor import Predictor

TARGETS = {
    "artery": "Please segment the arteries.",
    "vein": "Please segment the veins.",
    "stenosis": "Please segment the narrowing.",
}
# different sides and aspects: InternVL at max_tiles=4 reads them as 3, 1 and 3 tiles (thumbnail included)
SIZES = ((56, 112), (64, 64), (112, 60))


@pytest.fixture(scope="module", params=["tiny", "tiny_qwen2_5vl", "tiny_qwen3vl"])
def predictor(request):
    model = preset(request.param)
    if model.family == "internvl":
        model = dataclasses.replace(model, max_tiles=4)
    return Predictor.load("random", model=model, device="cpu")


def _batch(predictor: Predictor) -> dict:
    from vseg.inference.inputs import PredictItem

    images = [
        generate_vessels(seed=500 + i, size=max(s), style="fundus")[0][: s[0], : s[1]] for i, s in enumerate(SIZES)
    ]
    items = [PredictItem(i, f"im{i}", "", pixels=image) for i, image in enumerate(images)]
    dataset = predictor.dataset(items, targets=TARGETS)
    return dataset.collate([dataset[i] for i in range(len(items))])


def _count_vision_calls(predictor: Predictor) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """A hook on the family's vision module that records the leading size (tiles / patches) of each call."""
    model = predictor.model
    vision = model.base_mllm.get_submodule(model.family.vision_prefix.rstrip("."))
    calls: list[int] = []

    def hook(module, args, kwargs):
        pixels = args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))
        calls.append(int(pixels.shape[0]))

    return calls, vision.register_forward_pre_hook(hook, with_kwargs=True)


def test_the_vision_encoder_runs_once_per_image(predictor):
    batch = _batch(predictor)
    n_images, n_targets = len(SIZES), len(TARGETS)
    assert batch["input_ids"].shape[0] == n_images * n_targets
    per_image = batch["mllm_inputs"]["pixel_values"].shape[0]  # tiles (InternVL) / patches (Qwen-VL) of the images
    per_row = predictor.model.family.collate(batch["mllm_single"])["pixel_values"].shape[0]
    assert per_row == n_targets * per_image
    if predictor.model.family.name == "internvl":  # images of different tile counts: the gather is exercised
        tiles = [int(batch["mllm_single"][n_targets * i]["pixel_values"].shape[0]) for i in range(n_images)]
        assert tiles == [3, 1, 3]  # 2 tiles + thumbnail, 1 tile, 2 tiles + thumbnail

    calls, handle = _count_vision_calls(predictor)
    try:
        shared = predictor(batch)
    finally:
        handle.remove()
    assert calls == [per_image]  # one call, over each image's pixels once

    # The path that reads the image in every row: per-row image inputs and SAM-2 images.
    engine = predictor.engine()
    rows = {
        **batch,
        "mllm_inputs": predictor.model.family.collate(batch["mllm_single"]),
        "sam_pixel_values": batch["sam_pixel_values"][batch["row_image"]],
    }
    calls, handle = _count_vision_calls(predictor)
    try:
        with torch.inference_mode():
            logits = engine.seg_logits(rows["input_ids"], rows["attention_mask"], rows)
    finally:
        handle.remove()
    assert calls == [per_row]
    per_row_predictions = engine.finish(logits, [tuple(s) for s in batch["image_sizes"]], [engine.answer] * len(logits))

    assert len(shared) == n_images
    for i, targets in enumerate(shared):
        assert list(targets) == list(TARGETS)
        for j, name in enumerate(TARGETS):
            alone = per_row_predictions[i * n_targets + j]
            assert targets[name].answer == alone.answer
            assert targets[name].seg_tokens == alone.seg_tokens == 1
            assert np.array_equal(targets[name].mask, alone.mask)
            assert targets[name].mean_logit == pytest.approx(alone.mean_logit, rel=1e-5, abs=1e-6)


def test_shared_hidden_states_equal_per_row_states(predictor):
    """The LLM sees the same inputs either way: its last hidden states agree to float rounding."""
    batch = _batch(predictor)
    model = predictor.model
    with torch.inference_mode():
        shared = model.decoder_states(
            batch["input_ids"], batch["attention_mask"], batch["mllm_inputs"], batch["row_image"]
        )
        per_row = model.decoder_states(
            batch["input_ids"], batch["attention_mask"], model.family.collate(batch["mllm_single"])
        )
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(shared[real], per_row[real], rtol=1e-5, atol=1e-5)


def test_rows_must_cover_every_image(predictor):
    batch = _batch(predictor)
    keep = batch["row_image"] != 1  # drop image 1's rows but keep its pixels
    with pytest.raises(ValueError, match="every image of the batch must be shown by a row"):
        predictor.model.decoder_states(
            batch["input_ids"][keep], batch["attention_mask"][keep], batch["mllm_inputs"], batch["row_image"][keep]
        )


def test_generate_mode_with_targets_still_runs():
    """Generation asks one row at a time (vision per row there); its masks still come per target (one family:
    the generate path does not depend on it). A random model rarely stops by itself: 3 new tokens at most."""
    model = dataclasses.replace(preset("tiny"), max_tiles=4)
    predictor = Predictor.load("random", model=model, device="cpu", answer="generate", max_new_tokens=3)
    batch = _batch(predictor)
    out = predictor(batch)
    assert len(out) == len(SIZES) and all(list(t) == list(TARGETS) for t in out)
    for image, targets in zip(batch["images"], out, strict=True):
        assert all(p.mask.shape == image.shape[:2] for p in targets.values())


@pytest.mark.slow  # 512-px synthetic images and two timed passes each: tens of seconds on a busy CPU
def test_bench_targets_part_on_the_tiny_model():
    """`bench/predict.py --parts targets` (the H200 measurement) runs end to end on the CPU with the tiny model."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "predict.py"
    spec = importlib.util.spec_from_file_location("bench_predict", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    one, three = bench.bench_targets("tiny", batch=2, iters=1, counts=[1, 3])
    assert (one["targets"], one["rows"], three["rows"]) == (1, 2, 6)
    assert three["rows_per_second"] == pytest.approx(3 * three["images_per_second"])
    shared_vs_rows = three["per_row_vision"]
    assert shared_vs_rows["masks"] == 6 and shared_vs_rows["masks_equal"] == 6 and "per_row_vision" not in one
