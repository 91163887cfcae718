"""The training setup of `build_sa2va`: `lora=heads_only` (no LoRA, only the Sa2VA heads and the added token
rows train) builds, trains only what it should, and merges / exports like a LoRA run."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_batch, tiny_cfg
from vseg.artifacts import build_sa2va
from vseg.artifacts.adapters import merge_adapters
from vseg.model.processor import Sa2VAProcessor
from vseg.model.tokenizer import SA2VA_ADDED_TOKENS, token_id


def _batch(processor: Sa2VAProcessor) -> dict:
    return random_batch(processor, [(48, 56)] * 2)


def _forward(model, batch):
    return model(
        batch["input_ids"], batch["attention_mask"], batch["labels"], batch["sam_pixel_values"], batch["mllm_inputs"]
    )


@pytest.mark.parametrize("tied", [True, False])
def test_heads_only_trains_heads_and_token_rows_only(tied):
    cfg = tiny_cfg(["lora=heads_only", f"model.tie_word_embeddings={str(tied).lower()}"])
    torch.manual_seed(0)
    model, tokenizer = build_sa2va(cfg.model, cfg.lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("lora_" in n for n in trainable)
    deltas = [n for n in trainable if "trainable_tokens_delta" in n]
    assert len(deltas) == (1 if tied else 2)  # a tied LM head shares the embedding's rows
    assert any(n.startswith("text_hidden_fcs.") for n in trainable)
    assert any("mask_decoder" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    assert not any("language_model.layers" in n for n in trainable)

    processor = Sa2VAProcessor.for_model(model, tokenizer, cfg.model, cfg.data.max_length)
    batch = _batch(processor)
    embedding = model.base_mllm.get_input_embeddings()
    before = embedding.weight.detach().clone() if hasattr(embedding, "weight") else None
    out = _forward(model, batch)
    (out.llm_loss_sum / out.llm_tokens + out.mask_logits.sigmoid().mean()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    optimizer.step()

    # Only the added rows of the effective embedding moved.
    model.eval()
    merged = merge_adapters(model)
    weight = merged.base_mllm.get_input_embeddings().weight
    new_ids = sorted(token_id(tokenizer, t) for t in SA2VA_ADDED_TOKENS)
    reference = before if before is not None else weight
    changed = (weight != reference).any(dim=1).nonzero().flatten().tolist()
    assert set(changed) <= set(new_ids)
    if tied:
        assert merged.base_mllm.lm_head.weight is weight


@pytest.mark.parametrize("tied", [True, False])
def test_heads_only_merged_equals_unmerged(tied):
    cfg = tiny_cfg(["lora=heads_only", f"model.tie_word_embeddings={str(tied).lower()}"])
    torch.manual_seed(0)
    model, tokenizer = build_sa2va(cfg.model, cfg.lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    processor = Sa2VAProcessor.for_model(model, tokenizer, cfg.model, cfg.data.max_length)
    batch = _batch(processor)
    model.eval()
    with torch.no_grad():
        before = _forward(model, batch)
        merged = merge_adapters(model)
        after = _forward(merged, batch)
    torch.testing.assert_close(after.llm_loss_sum, before.llm_loss_sum)
    torch.testing.assert_close(after.mask_logits, before.mask_logits)


def test_building_leaves_the_run_config_as_it_was(cfg, monkeypatch):
    """A resumed run and every DDP rank compare their config with the one saved in the run directory, so the build
    must not write into it. transformers 5.17's Sam2Config wrote `model_type` into the `vision_config` dict it
    was given (resume and DDP then refused the run as another model); here a config class that writes into
    every nested dict it gets stands in for it."""
    import copy

    import vseg.model.build as build

    real = build.Sam2Config

    types = {
        "vision_config": "sam2_vision_model",
        "prompt_encoder_config": "sam2_prompt_encoder",
        "mask_decoder_config": "sam2_mask_decoder",
    }

    def writing(**kwargs):  # as transformers 5.17's Sam2Config: the sub-configs' model types, into their dicts
        for key, value in kwargs.items():
            if isinstance(value, dict) and key in types:
                value.setdefault("model_type", types[key])
        return real(**kwargs)

    monkeypatch.setattr(build, "Sam2Config", writing)
    before = copy.deepcopy(cfg.model)
    assert "model_type" not in before.sam2["vision_config"]  # else the stand-in writes nothing new
    build.build_sam2(cfg.model)
    assert cfg.model == before
