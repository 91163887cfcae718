"""Every MLLM family at toy size: builds, one forward gives mask logits and an LLM loss, every trainable
parameter gets a gradient, LoRA lands only on the LLM, and a short run through `vseg.training.run.run` works."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vseg.artifacts import build_sa2va
from vseg.model.families import get_family, smart_resize, vocab_size
from vseg.model.processor import Sa2VAProcessor
from vseg.model.sa2va import IGNORE_INDEX
from vseg.model.tokenizer import QWEN_IMAGE_PAD_TOKEN, build_tiny_tokenizer, token_id
from vseg.training.run import run

from conftest import random_batch, tiny_cfg

TINY = {"tiny": "internvl", "tiny_qwen2_5vl": "qwen2_5_vl", "tiny_qwen3vl": "qwen3_vl"}


def _built(model_name: str):
    cfg = tiny_cfg([f"model={model_name}"])
    torch.manual_seed(0)
    model, tokenizer = build_sa2va(cfg.model, cfg.lora)
    processor = Sa2VAProcessor.for_model(model, tokenizer, cfg.model, cfg.data.max_length)
    return cfg, model, tokenizer, processor


def _batch(processor, sizes=((60, 72), (90, 50))):
    return random_batch(processor, sizes)


@pytest.mark.parametrize("model_name", list(TINY))
def test_family_forward_backward_and_what_trains(model_name):
    cfg, model, tokenizer, processor = _built(model_name)
    family = model.family
    assert family.name == TINY[model_name] == cfg.model.family
    batch = _batch(processor)  # two images of different sizes in one batch
    out = model(
        batch["input_ids"], batch["attention_mask"], batch["labels"], batch["sam_pixel_values"], batch["mllm_inputs"]
    )
    low = model.grounding.low_res_size
    assert out.mask_logits.shape == (2, low, low) and out.seg_sample_index.tolist() == [0, 1]
    assert out.llm_tokens == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) > 0
    assert torch.isfinite(out.llm_loss_sum) and out.llm_loss_sum > 0
    (out.llm_loss_sum / out.llm_tokens + out.mask_logits.sigmoid().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []

    projector = family.projector_prefix if isinstance(family.projector_prefix, tuple) else (family.projector_prefix,)
    for name, p in model.base_mllm.named_parameters():
        if "lora_" in name:
            assert name.startswith(family.language_prefix), f"adapter outside the LLM: {name}"
        elif name.startswith(projector):
            assert p.requires_grad, f"projector parameter {name} is frozen"
        elif name.startswith(family.vision_prefix):
            assert not p.requires_grad, f"vision parameter {name} trains"
    assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("model_name", ["tiny_qwen2_5vl", "tiny_qwen3vl"])
def test_qwen_image_inputs_match_the_prompt(model_name):
    cfg, model, tokenizer, processor = _built(model_name)
    mllm_config = model.base_mllm.config
    rng = np.random.default_rng(1)
    sample = processor.encode(rng.integers(0, 255, (90, 50, 3), dtype=np.uint8), "Segment the vessels.", "It is [SEG].")
    inputs = sample["mllm_inputs"]
    vision = mllm_config.vision_config
    t, h, w = inputs["image_grid_thw"][0].tolist()
    # First resize: 90x50 -> 84x56 (multiples of 28); then the processor to patch*merge within the bounds.
    unit = vision.patch_size * vision.spatial_merge_size
    assert t == 1 and (h * vision.patch_size) % unit == 0 and (w * vision.patch_size) % unit == 0
    area = h * w * vision.patch_size**2
    assert cfg.model.min_pixels <= area <= cfg.model.max_pixels
    assert inputs["pixel_values"].shape == (t * h * w, 3 * vision.temporal_patch_size * vision.patch_size**2)
    pads = int((sample["input_ids"] == token_id(tokenizer, QWEN_IMAGE_PAD_TOKEN)).sum())
    assert pads == t * h * w // vision.spatial_merge_size**2
    assert mllm_config.image_token_id == token_id(tokenizer, QWEN_IMAGE_PAD_TOKEN)
    text = tokenizer.decode(sample["input_ids"])
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")


def test_smart_resize_rounds_and_bounds():
    assert smart_resize(90, 50, 28, 4 * 28 * 28, 16384 * 28 * 28) == (84, 56)
    h, w = smart_resize(60, 72, 28, 512 * 28 * 28, 2048 * 28 * 28)  # small images grow to min_pixels
    assert h % 28 == 0 and w % 28 == 0 and h * w >= 512 * 28 * 28
    h, w = smart_resize(4000, 3000, 32, 4096, 2048 * 32 * 32)  # large ones shrink below max_pixels
    assert h % 32 == 0 and w % 32 == 0 and h * w <= 2048 * 32 * 32 and h > w
    with pytest.raises(ValueError):
        smart_resize(0, 10, 28, 1, 10**6)


def test_vocab_size_is_fixed_by_the_config_and_checked_against_real_tokenizers():
    tokenizer = build_tiny_tokenizer()
    cfg = tiny_cfg(["model=sa2va_1b"]).model
    assert vocab_size(cfg, tokenizer) == 151679  # tiny tokenizer stands in; the release's V is kept
    cfg.tokenizer_path = "/some/Sa2VA-1B"  # a tokenizer read from a folder must have exactly V tokens
    with pytest.raises(ValueError, match="model.text.vocab_size=151679"):
        vocab_size(cfg, tokenizer)
    cfg.text = {**cfg.text, "vocab_size": None}
    assert vocab_size(cfg, tokenizer) == len(tokenizer)
    small = tiny_cfg().model
    small.text = {**small.text, "vocab_size": 10}
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        vocab_size(small, tokenizer)


def test_unknown_family_is_a_config_error():
    from vseg.config import ConfigError

    with pytest.raises(ConfigError, match="model.family='llava'"):
        tiny_cfg(["model.family=llava"])
    with pytest.raises(ValueError, match="known"):
        get_family("llava")


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["tiny_qwen2_5vl", "tiny_qwen3vl"])
def test_training_steps_through_run(model_name, tmp_path):
    cfg = tiny_cfg([f"model={model_name}", f"run_dir={tmp_path}", "trainer.max_steps=3", "optim.lr=1e-2"])
    result = run(cfg)
    assert result.global_step == 3
    assert (tmp_path / "weights" / "trainable.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
