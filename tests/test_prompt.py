"""Prompts exactly as the authors' code builds them, per family and `model.prompt_style`.

The expected strings are rebuilt here step by step the way bytedance/Sa2VA does it:
* training (projects/sa2va/datasets): human turn `"<image>\\n" + question`; `<image>` replaced by the family's
  image-token string (`start + context * n + end`), the turn stripped, wrapped in the xtuner INSTRUCTION;
* InternVL `predict_forward`: the image-token string gets `"\\n"` appended and is then stripped (one image), and
  replaces `<image>` in the caller's text (the README's `"<image>" + question`);
* Qwen-VL `predict_forward`: `<image>` removed from the text, messages `[image, text]` rendered by the
  processor's chat template with `add_generation_prompt=True`, the single `<|image_pad|>` then expanded.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.conftest import tiny_cfg
from vseg.artifacts import build_sa2va
from vseg.model.processor import Sa2VAProcessor
from vseg.model.tokenizer import get_template

QUESTION = "Please segment the vessels."
# A Qwen2.5-VL-style chat template (default system turn; image parts as vision markers), written for this test.
QWEN25_STYLE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MARKERS = {"tiny": ("<img>", "<IMG_CONTEXT>", "</img>")}
MARKERS["tiny_qwen2_5vl"] = MARKERS["tiny_qwen3vl"] = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")


@pytest.fixture(scope="module", params=sorted(MARKERS))
def family_model(request):
    cfg = tiny_cfg([f"model={request.param}"])
    torch.manual_seed(0)
    model, tokenizer = build_sa2va(cfg.model, None)
    return request.param, cfg, model, tokenizer


def _encode(family_model, style: str, answer: str | None = None):
    name, cfg, model, tokenizer = family_model
    model_cfg = dataclasses.replace(cfg.model, prompt_style=style)
    processor = Sa2VAProcessor.for_model(model, tokenizer, model_cfg, 4096)
    image = np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)
    features = processor.encode(image, QUESTION, answer)
    start, context, end = MARKERS[name]
    n = int((features["input_ids"] == tokenizer.convert_tokens_to_ids(context)).sum())
    image_tokens = f"{start}{context * n}{end}"
    return features, image_tokens, get_template(cfg.model.template), tokenizer


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_train_style_is_the_authors_training_prompt(family_model):
    features, image_tokens, template, tokenizer = _encode(family_model, "train", "It is [SEG].")
    human = ("<image>\n" + QUESTION).replace("<image>", image_tokens).strip()
    prompt = template.bos + template.instruction.format(input=human)
    prompt_ids = _ids(tokenizer, prompt)
    ids = features["input_ids"].tolist()
    assert ids[: len(prompt_ids)] == prompt_ids
    assert ids[len(prompt_ids) :] == _ids(tokenizer, "It is [SEG]." + template.suffix)
    assert f"{image_tokens}\n{QUESTION}" in tokenizer.decode(ids)


def test_chat_style_is_the_authors_predict_forward_prompt(family_model):
    name, *_ = family_model
    features, image_tokens, template, tokenizer = _encode(family_model, "chat")
    if name == "tiny":
        image_str = (image_tokens + "\n").strip()
        text = ("<image>" + QUESTION).replace("<image>", image_str)
        prompt = template.bos + template.instruction.format(input=text)
    else:  # no chat template in the tiny tokenizer: the xtuner template, markers then the question
        prompt = template.instruction.format(input=image_tokens + QUESTION)
    assert features["input_ids"].tolist() == _ids(tokenizer, prompt)
    assert f"{image_tokens[-12:]}{QUESTION}" in tokenizer.decode(features["input_ids"].tolist())


def test_chat_style_renders_a_qwen_folders_own_chat_template(family_model):
    name, _, _, tokenizer = family_model
    if name == "tiny":
        pytest.skip("InternVL's predict_forward formats with the xtuner template, not a chat template")
    tokenizer.chat_template = QWEN25_STYLE_TEMPLATE
    try:
        features, image_tokens, _, _ = _encode(family_model, "chat")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        expected = rendered.replace("<|image_pad|>", image_tokens[len("<|vision_start|>") : -len("<|vision_end|>")])
        assert features["input_ids"].tolist() == _ids(tokenizer, expected)
        assert tokenizer.decode(features["input_ids"].tolist()).startswith(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        )
    finally:
        tokenizer.chat_template = None


def test_unknown_prompt_style_is_refused():
    from vseg.config import ConfigError

    with pytest.raises(ConfigError, match=r"model\.prompt_style='html': train\|chat"):
        tiny_cfg(["+model.prompt_style=html"])
