"""Refinement by clicks: the mask of an image again, with positive / negative points for SAM-2's prompt encoder
next to the [SEG] embedding (as SAM-2 takes clicks next to a box). `Predictor.refine` is the front door.

The MLLM pass ([SEG] embedding) and the SAM-2 image encoding run once per (image, prompt) and are kept in a
small cache the predictor owns, so each further click costs one mask-decoder pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vseg.inference import latency
from vseg.inference.engine import ItemPrediction, to_device
from vseg.inference.inputs import DEFAULT_PROMPT, InputError, PredictItem, collate

#: (image, prompt) encodings kept: a page edits one image at a time; a few are kept, the oldest leaves first
KEEP = 4


def refine(
    predictor: Any,
    cache: dict[str, Any],
    image: np.ndarray,
    prompt: str | None,
    points: Sequence[Sequence[float]],
    labels: Sequence[int],
) -> ItemPrediction:
    """The teacher-forced prediction of `image` for `prompt`, with its probability map, corrected by clicks.

    Args:
        predictor: the `Predictor` (its model, processor, placement and teacher-forced engine).
        cache: the predictor's (image, prompt) -> encodings store, updated here.
        image: HxWx3 uint8.
        prompt: the question (None: the vessel prompt).
        points: clicks as (x, y) in the image's pixels.
        labels: per click, 1 = vessel here, 0 = not vessel here.
    """
    if len(points) != len(labels):
        raise ValueError(f"{len(points)} points for {len(labels)} labels: give one label (1 or 0) per point")
    prompt = prompt or DEFAULT_PROMPT
    key = hashlib.sha1(np.ascontiguousarray(image).tobytes() + repr((image.shape, prompt)).encode()).hexdigest()
    if key not in cache:
        dataset = predictor.dataset([PredictItem(0, "refine", prompt, pixels=image)], mode="teacher_forced")
        batch = collate(predictor.processor, [dataset[0]])
        if batch["failed"]:
            raise InputError(f"image: {batch['failed'][0][1]}")
        if predictor.device_map is None:
            batch = to_device(batch, predictor.device)
        if predictor.cuda_graphs:
            latency.step_begin()
        seg = predictor.engine("teacher_forced").seg_prompts(
            batch["input_ids"], batch["attention_mask"], batch["mllm_inputs"], batch["sam_pixel_values"]
        )
        while len(cache) >= KEEP:
            cache.pop(next(iter(cache)))
        cache[key] = seg
    prompts, sample_index, features = cache[key]
    n = prompts.shape[0]
    grounding = predictor.model.grounding
    h, w = image.shape[:2]
    point_t = label_t = None
    if len(points):
        side = grounding.image_size  # SAM-2's input is the image stretched to side x side
        xy = torch.tensor([[x * side / w, y * side / h] for x, y in points], dtype=torch.float32)
        point_t = xy[None].expand(n, -1, -1)
        label_t = torch.tensor([int(v) for v in labels])[None].expand(n, -1)
    logits = grounding.decode(features, prompts, sample_index, point_t, label_t)
    engine = predictor.engine("teacher_forced")
    return engine.finish([logits], [(h, w)], [engine.answer], probability=True)[0]
