"""resize=torch: torch's antialiased uint8 bicubic instead of PIL's, for prediction and serving.

Its pixels stay within 2 grey levels of PIL's on under 1 % of pixels (SAM-2 input, InternVL tiles with their
thumbnail, Qwen-VL's first resize), shapes / dtypes / layout are PIL's, predict.py's masks barely move, a served
request gives `Predictor`'s masks, and a bad value is a config error naming the field.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from vseg import Predictor
from vseg.config import ConfigError, compose
from vseg.config.predict import load_predict_config
from vseg.data.synthetic import generate_vessels
from vseg.inference.inputs import DEFAULT_PROMPT
from vseg.model.preprocess import internvl_tiles, sam_pixels
from vseg.predict import run as predict
from vseg.serve import config_from_args
from vseg.serve.service import Service

from conftest import tiny_cfg


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _vessels(width: int, height: int, seed: int = 0) -> Image.Image:
    """A synthetic angiogram stretched to width x height (LANCZOS: the test image, not the resize under test)."""
    image = generate_vessels(seed=seed, size=max(64, min(width, height)), style="angiogram")[0]
    return Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS)


def _assert_close(pil: torch.Tensor, fast: torch.Tensor, max_levels: int = 2, max_fraction: float = 0.01) -> None:
    assert fast.shape == pil.shape and fast.dtype == pil.dtype == torch.uint8
    assert fast.is_contiguous() and pil.is_contiguous()
    diff = (pil.int() - fast.int()).abs()
    fraction = float((diff > 0).float().mean())
    assert int(diff.max()) <= max_levels and fraction < max_fraction, (int(diff.max()), fraction)


# upscales, downscales, wide and tall images
SIZES = [(512, 512), (565, 584), (300, 1000), (1000, 300), (800, 600), (64, 48), (1400, 1400)]


@pytest.mark.parametrize("content", [_noise, _vessels])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_sam_pixels_torch_within_two_levels_of_pil(content, width, height):
    image = content(width, height)
    _assert_close(sam_pixels(image, 1024), sam_pixels(image, 1024, resize="torch"))


@pytest.mark.parametrize(("width", "height"), [(565, 584), (1000, 300), (800, 600), (64, 48), (448, 448), (896, 448)])
def test_internvl_tiles_torch_within_two_levels_of_pil(width, height):
    """Multi-tile grids (4, 12 tiles + thumbnail) and the one-tile and same-size cases."""
    for image in (_noise(width, height, 1), _vessels(width, height, 1)):
        pil = internvl_tiles(image, 448, max_tiles=12)
        fast = internvl_tiles(image, 448, max_tiles=12, resize="torch")
        _assert_close(pil, fast)
    if (width, height) in ((448, 448), (896, 448)):  # the grid is the image's size: no resize, same tiles
        grid = pil.shape[0] if pil.shape[0] == 1 else pil.shape[0] - 1  # the thumbnail is resized
        assert torch.equal(pil[:grid], fast[:grid])


@pytest.mark.parametrize("content", [_noise, _vessels])
def test_downscales_that_pillow_runs_vertically_first(content):
    """Pillow 13 resizes vertically first when the height shrinks much more than the width; torch's one call
    goes horizontally first, and in that order a quarter of the pixels would round (and clip) differently.
    The torch path follows the installed Pillow's order, so the bound holds there too."""
    image = content(300, 1000, 2)  # InternVL thumbnail 300x1000 -> 448x448: the height shrinks, the width grows
    _assert_close(internvl_tiles(image, 448, 12), internvl_tiles(image, 448, 12, resize="torch"))
    image = content(1500, 2000, 2)  # SAM-2: 1500x2000 -> 1024x1024
    _assert_close(sam_pixels(image, 1024), sam_pixels(image, 1024, resize="torch"))


def test_unknown_resize_is_refused():
    with pytest.raises(ValueError, match="resize='cv2'"):
        sam_pixels(_noise(8, 8), 16, resize="cv2")


@pytest.mark.parametrize("model_name", ["tiny", "tiny_qwen2_5vl"])
def test_processor_features_follow_its_resize(model_name):
    """The processor's method reaches SAM-2's input and the family's (InternVL tiles; Qwen's first resize, whose
    patches the transformers image processor then makes the same way for both)."""
    from vseg.artifacts import build_sa2va
    from vseg.model.processor import Sa2VAProcessor

    cfg = tiny_cfg([f"model={model_name}"])
    model, tokenizer = build_sa2va(cfg.model, cfg.lora)
    pil = Sa2VAProcessor.for_model(model, tokenizer, cfg.model, 4096)
    fast = dataclasses.replace(pil, resize="torch")
    image = np.asarray(_vessels(300, 220, 3))
    a, b = pil.encode(image, "Segment.", None), fast.encode(image, "Segment.", None)
    assert torch.equal(a["input_ids"], b["input_ids"])
    _assert_close(a["sam_pixel_values"], b["sam_pixel_values"])
    pixels_a, pixels_b = a["mllm_inputs"]["pixel_values"], b["mllm_inputs"]["pixel_values"]
    assert pixels_a.shape == pixels_b.shape and pixels_a.dtype == pixels_b.dtype
    if model_name == "tiny":
        _assert_close(pixels_a, pixels_b)
    else:  # normalised with mean = std = 0.5: one grey level is 2 / 255; a second (PIL) resize follows
        assert torch.equal(a["mllm_inputs"]["image_grid_thw"], b["mllm_inputs"]["image_grid_thw"])
        levels = (pixels_a - pixels_b).abs() * 255 / 2
        assert float(levels.max()) <= 2.01 and float((levels > 0.5).float().mean()) < 0.01
    with pytest.raises(ValueError, match="resize='fast'"):
        dataclasses.replace(pil, resize="fast")


def test_bad_resize_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"resize='cv2': expected one of \('pil', 'torch'\)"):
        load_predict_config(compose("predict", ["ckpt=random", "model=tiny", "resize=cv2"]))
    with pytest.raises(ConfigError, match=r"resize='cv2': expected one of \('pil', 'torch'\)"):
        config_from_args(["ckpt=random", "model=tiny", "resize=cv2"])
    with pytest.raises(ConfigError, match="resize='cv2'"):
        Predictor.load("random", model="tiny", device="cpu", resize="cv2")


def test_predict_py_resize_torch_masks_agree_with_pil(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, size in enumerate((64, 96, 120)):
        Image.fromarray(generate_vessels(seed=500 + i, size=size, style="angiogram")[0]).save(folder / f"im{i}.png")
    masks = {}
    for method in ("pil", "torch"):
        out = tmp_path / method
        args = ["ckpt=random", "model=tiny", f"input={folder}", f"output={out}", "device=cpu", "num_workers=0"]
        predict(compose("predict", [*args, f"resize={method}"]))
        masks[method] = {p.stem: np.asarray(Image.open(p)) > 0 for p in sorted((out / "masks").glob("*.png"))}
    assert sorted(masks["pil"]) == sorted(masks["torch"]) == ["im0", "im1", "im2"]
    for name, mask in masks["pil"].items():
        agree = float((mask == masks["torch"][name]).mean())
        assert agree >= 0.999, f"{name}: resize=torch agrees with pil on {agree:.4%} of pixels"


@pytest.mark.parametrize("where", ["threads", "processes"])
def test_served_request_with_resize_torch_gives_the_predictors_masks(where):
    """The serve preparation pool (threads, or spawned processes that get the processor pickled) encodes with
    the configured method: a request's mask equals `Predictor(resize=torch)`'s."""
    cfg = config_from_args(["ckpt=random", "model=tiny", "device=cpu", "port=9123", f"prepare={where}", "workers=1",
                            "resize=torch"])  # fmt: skip
    service = Service(cfg)
    service.load()
    try:
        assert service.state == "ready", service.error
        assert service.replicas[0].predictor.processor.resize == "torch"
        images = [generate_vessels(seed=610 + i, size=80 + 16 * i, style="angiogram")[0] for i in range(2)]
        expected = Predictor.load("random", model="tiny", device="cpu", resize="torch").predict(images)
        for image, want in zip(images, expected, strict=True):
            outcome = service.prepare_segment(_source(image), "teacher_forced", DEFAULT_PROMPT).result(timeout=120)
            assert (outcome.prediction.mask == want.mask).all()
    finally:
        service.close()


def _source(image: np.ndarray):
    import io

    from vseg.serve.prepare import ImageSource

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return ImageSource("images[0]", raw=buffer.getvalue())
