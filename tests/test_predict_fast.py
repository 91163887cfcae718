"""The fast-prediction options on CPU: FP8 refusal and layer selection, static token padding, chunked feeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vseg.config import ConfigError
from vseg.config.predict import PredictConfig
from vseg.inference.engine import Engine
from vseg.inference.feed import chunk_size, device_batches, merge
from vseg.inference.latency import pad_tokens
from vseg.inference.quantize import FP8_PARTS, check_fp8_device, fp8_parts, quantize_fp8

from conftest import random_batch


def test_fp8_is_refused_on_cpu_with_a_clear_message():
    from vseg import Predictor

    with pytest.raises(ConfigError, match="float8 tensor cores"):
        check_fp8_device("cpu")
    # refused before the model is built
    with pytest.raises(ConfigError, match="fp8=true needs an NVIDIA GPU"):
        Predictor.load("random", model="tiny", device="cpu", fp8=True)


def test_fp8_parts_cover_the_frozen_encoders_and_the_llm(built):
    model, _, _ = built
    model = model.to(torch.bfloat16).requires_grad_(False)
    parts = fp8_parts(model)
    assert set(parts) == set(FP8_PARTS)
    linears = {p: [m for root in roots for m in root.modules() if type(m) is nn.Linear] for p, roots in parts.items()}
    assert all(linears.values()), {p: len(v) for p, v in linears.items()}
    # the LM head, the [SEG] projection and the mask decoder are not in any part
    chosen = {id(m) for v in linears.values() for m in v}
    assert id(model.family.lm_head(model.base_mllm)) not in chosen
    assert not any(id(m) in chosen for m in model.text_hidden_fcs.modules())
    assert not any(id(m) in chosen for m in model.grounding.sam.mask_decoder.modules())
    with pytest.raises(ConfigError, match="fp8 parts"):
        quantize_fp8(model, ["lm_head"])


def test_right_padding_to_a_token_multiple_keeps_the_masks(built):
    """Causal attention: pads after the prompt change no [SEG] state, so the logits are the same."""
    model, tokenizer, processor = built
    model.eval()
    batch = random_batch(processor, sizes=((40, 48), (40, 48)))
    engine = Engine(model, tokenizer, "phi3_chat")
    padded = pad_tokens(batch, 64, tokenizer.pad_token_id)
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] >= batch["input_ids"].shape[1]
    n = batch["input_ids"].shape[1]
    assert torch.equal(padded["input_ids"][:, :n], batch["input_ids"])
    assert not padded["attention_mask"][:, n:].any()
    with torch.inference_mode():
        plain = engine.seg_logits(batch["input_ids"], batch["attention_mask"], batch)
        pad = engine.seg_logits(padded["input_ids"], padded["attention_mask"], padded)
    for a, b in zip(plain, pad, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_chunks_merged_equal_one_collated_batch(built):
    _, tokenizer, processor = built
    rng = np.random.default_rng(0)
    samples = [
        processor.encode(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), prompt, "It is [SEG].", sample_id=f"s{i}")
        for i, prompt in enumerate(["Segment.", "Segment the vessels, please.", "Segment the arteries.", "Go."])
    ]
    whole = processor.collate(samples)
    chunks = [processor.collate(samples[:1]), processor.collate(samples[1:3]), processor.collate(samples[3:])]
    for c in chunks:
        c.update(items=list(c["ids"]), failed=[])
    merged = merge(chunks, tokenizer.pad_token_id)
    for key in ("input_ids", "labels", "attention_mask", "sam_pixel_values"):
        assert torch.equal(merged[key], whole[key]), key
    for key, value in whole["mllm_inputs"].items():
        assert torch.equal(merged["mllm_inputs"][key], value)
    assert merged["ids"] == whole["ids"] and merged["image_sizes"] == whole["image_sizes"]
    # batches of 3 from chunks of 1, 2, 1: the first batch closes once it holds 3 inputs, the rest follows
    sizes = [len(b["items"]) for b in device_batches(chunks, 3, None, tokenizer.pad_token_id)]
    assert sizes == [3, 1]


def test_chunk_size_spreads_a_batch_over_the_workers():
    assert chunk_size(32, 8) == 4
    assert chunk_size(32, 0) == 32 and chunk_size(32, 1) == 32
    assert chunk_size(30, 8) == 3  # a divisor of the batch, so batches come out whole
    assert chunk_size(7, 4) == 1


def test_predict_config_checks_the_fast_options():
    with pytest.raises(ConfigError, match="compile_mode"):
        PredictConfig(ckpt="random", compile_mode="fastest").validate()
    with pytest.raises(ConfigError, match="fp8=true converts the model on one GPU"):
        PredictConfig(ckpt="random", fp8=True, device_map="balanced").validate()
    with pytest.raises(ConfigError, match="fp8=true starts from bfloat16"):
        PredictConfig(ckpt="random", fp8=True, dtype="float32").validate()
    PredictConfig(ckpt="random", fp8=True, compile=True, compile_mode="reduce-overhead").validate()
