"""The tiny Sa2VA network: what trains, what stays frozen, and the [SEG] -> SAM-2 path."""

from __future__ import annotations

import numpy as np
import torch

from vseg.model.sa2va import IGNORE_INDEX
from vseg.model.tokenizer import SA2VA_ADDED_TOKENS, SEG_TOKEN, token_id

from conftest import random_batch


def _batch(processor, n=2, seed=0, size=(60, 72)):
    return random_batch(processor, [size] * n, seed)


def _forward(model, batch):
    return model(
        batch["input_ids"], batch["attention_mask"], batch["labels"], batch["sam_pixel_values"], batch["mllm_inputs"]
    )


def test_trainable_and_frozen_parts(built):
    model, _, _ = built
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert any("trainable_tokens_delta" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    assert any(n.startswith("text_hidden_fcs.") for n in trainable)
    assert any("mask_decoder.transformer" in n for n in trainable)
    # Frozen: vision tower, SAM-2 image + prompt encoders, LLM base weights.
    assert not any("vision_tower" in n for n in trainable)
    assert not any("vision_encoder" in n or "prompt_encoder" in n for n in trainable)
    assert not any("lora" not in n and "language_model.layers" in n for n in trainable)
    assert any("language_model.layers.0.self_attn.q_proj.base_layer.weight" in n for n in frozen)
    # Adapters only on the LLM, never on the vision tower's own q/k/v projections.
    assert not any("vision_tower" in n and "lora" in n for n in model.state_dict())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_one_step_changes_only_trainable_parameters(built):
    model, _, processor = built
    batch = _batch(processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = _forward(model, batch)
    loss = out.llm_loss_sum / out.llm_tokens + out.mask_logits.sigmoid().mean()
    loss.backward()
    missing_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing_grad == []  # DDP without find_unused_parameters relies on this
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            if "lora_B" in n or "lora_A" in n or "trainable_tokens" in n or "text_hidden_fcs" in n:
                assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def test_new_token_rows_train_and_old_rows_do_not(built):
    model, tokenizer, processor = built
    emb = model.base_mllm.get_input_embeddings()
    new_ids = [token_id(tokenizer, t) for t in SA2VA_ADDED_TOKENS]
    old_ids = [i for i in range(len(tokenizer)) if i not in new_ids]
    ids = torch.arange(len(tokenizer))
    before = emb(ids).detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    out = _forward(model, _batch(processor))
    (out.llm_loss_sum + out.mask_logits.mean()).backward()
    opt.step()
    after = emb(ids).detach()
    seg = token_id(tokenizer, SEG_TOKEN)
    assert not torch.equal(after[seg], before[seg])
    assert torch.equal(after[old_ids], before[old_ids])
    # Tied head: the [SEG] output row follows the input row.
    head = model.base_mllm.lm_head
    probe = torch.zeros(1, after.shape[1])
    probe[0, 0] = 1.0
    assert torch.allclose(head(probe)[0, seg], after[seg, 0], atol=1e-6)


def test_labels_supervise_only_the_answer(built):
    _, tokenizer, processor = built
    batch = _batch(processor, n=1)
    labels = batch["labels"][0]
    supervised = tokenizer.decode(labels[labels != IGNORE_INDEX])
    assert supervised == "It is [SEG].<|im_end|>"
    text = tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<|im_start|>user\n<img><IMG_CONTEXT>")
    assert text.count("<IMG_CONTEXT>") == processor.mllm_config.image_seq_length


def test_seg_state_is_taken_at_the_seg_input_position(built):
    model, tokenizer, processor = built
    model.eval()
    batch = _batch(processor)
    with torch.no_grad():
        hidden = model.decoder_states(batch["input_ids"], batch["attention_mask"], batch["mllm_inputs"])
        prompts, index = model.seg_embeddings(hidden, batch["input_ids"])
        seg = token_id(tokenizer, SEG_TOKEN)
        rows, cols = (batch["input_ids"] == seg).nonzero(as_tuple=True)
        expected = model.text_hidden_fcs(hidden[rows, cols])
    assert index.tolist() == [0, 1]
    torch.testing.assert_close(prompts, expected)


def test_mask_is_the_highest_iou_multimask_output(built):
    model, _, processor = built
    model.eval()
    grounding = model.grounding
    sam = grounding.sam
    batch = _batch(processor)
    with torch.no_grad():
        features = grounding.encode(batch["sam_pixel_values"])
        prompts = torch.randn(3, sam.config.prompt_encoder_config.hidden_size)
        index = torch.tensor([0, 1, 1])
        logits = grounding.decode(features, prompts, index)
        # Independent path: the prompt encoder's padding points + [SEG], decoder with multimask output.
        sparse, dense = sam.prompt_encoder(
            input_points=torch.zeros(3, 1, 1, 2),
            input_labels=-torch.ones(3, 1, 1, dtype=torch.int32),
            input_boxes=None,
            input_masks=None,
        )
        assert sparse.shape[2] == 2  # SAM-2 pads one more "not a point" when no box is given
        sparse = torch.cat([sparse, prompts[:, None, None]], dim=2)
        masks, iou, _, _ = sam.mask_decoder(
            image_embeddings=features.embeddings[index],
            image_positional_embeddings=sam.get_image_wide_positional_embeddings().expand(3, -1, -1, -1),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            high_resolution_features=[h[index] for h in features.high_res],
        )
    assert masks.shape[2] == 3
    best = iou[:, 0].argmax(-1)
    torch.testing.assert_close(logits, masks[torch.arange(3), 0, best])
    assert logits.shape == (3, grounding.low_res_size, grounding.low_res_size)


def test_batching_and_padding_are_inert(built):
    model, _, processor = built
    model.eval()
    rng = np.random.default_rng(1)
    image0, image1 = (rng.integers(0, 255, (60, 72, 3), dtype=np.uint8) for _ in range(2))
    mask = rng.random((60, 72)) > 0.7
    s0 = processor.encode(image0, "Segment the vessels.", "It is [SEG].", mask, "s0")
    # A longer question, so sample 0 is right-padded in the pair.
    s1 = processor.encode(
        image1, "Please segment the blood vessels in this image, all of them.", "It is [SEG].", mask, "s1"
    )
    with torch.no_grad():
        pair = _forward(model, processor.collate([s0, s1]))
        alone = _forward(model, processor.collate([s0]))
    assert pair.seg_sample_index.tolist() == [0, 1]
    torch.testing.assert_close(pair.mask_logits[0], alone.mask_logits[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(pair.mask_logits[0], pair.mask_logits[1])
