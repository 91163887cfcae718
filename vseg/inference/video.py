"""Runs (video, cine DICOM) through one model: the video front door next to `Predictor.predict` for images.

As Sa2VA's `predict_forward` does with a list of frames: the key frames (the authors: the first 5, which the
caller samples; here `key_frames` of them, `first` or `uniform`) go through the MLLM in one prompt, one tile
each (`<img>...</img>` per frame, joined by newlines, then the question); the answer's [SEG] states go through
`text_hidden_fcs`; SAM-2 then tracks each [SEG] through every frame with its memory (`vseg.model.tracking`),
prompted on the key frames. Masks reach each frame's size as images' do (`mask_logits_at`), several [SEG] are
merged (union). Frames wait on the CPU (`frames_on=cpu`, the default: a long run fits a 24 GB card) and are
resized and moved to the GPU one at a time; `frames_on=gpu` resizes them all up front and keeps them there.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vseg.config import ConfigError
from vseg.config.predict import FRAMES_ON, KEY_FRAME_MODES
from vseg.data.runs import Run
from vseg.inference.engine import to_device
from vseg.model.grounding import mask_logits_at
from vseg.model.preprocess import sam_pixels, to_pil
from vseg.model.processor import Sa2VAProcessor, SampleError
from vseg.model.tokenizer import SEG_TOKEN, get_template
from vseg.model.tracking import Tracker, key_frame_indices, tracking_unsupported


@dataclass
class RunPrediction:
    """What the model said about one run."""

    masks: np.ndarray  # (T, H, W) bool, every frame at the run's size
    answer: str
    seg_tokens: int
    key_frames: list[int]
    mean_logits: list[float]  # per frame, mean of the low-res logits (nan without [SEG])
    seconds: dict[str, float] = field(default_factory=dict)  # mllm, tracking


def encode_key_frames(
    processor: Sa2VAProcessor, frames: list[np.ndarray], question: str, answer: str | None
) -> dict[str, Any]:
    """Model inputs of a run's key frames: one tile per frame, the authors' multi-image prompt, the answer
    cut after its last [SEG] (nothing after it changes that state); `answer=None`: the prompt alone."""
    family = processor.family
    one_tile = dataclasses.replace(processor.model_cfg, max_tiles=1)
    parts = [family.image_inputs(processor.mllm_config, one_tile, to_pil(f), processor.resize) for f in frames]
    image_text = "\n".join(text for _, text in parts)
    template = get_template(processor.model_cfg.template)
    prompt_ids = processor.token_ids(processor.prompt(image_text, question))
    answer_ids = processor.token_ids(answer + template.suffix) if answer is not None else []
    seg_id = processor.tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    if seg_id in answer_ids:
        answer_ids = answer_ids[: len(answer_ids) - answer_ids[::-1].index(seg_id)]
    input_ids = prompt_ids + answer_ids
    if len(input_ids) > processor.max_length:
        raise SampleError(
            f"{len(frames)} key frames need {len(input_ids)} tokens, over max_length={processor.max_length}: "
            "use fewer key_frames"
        )
    return {
        "id": "run",
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor([-100] * len(input_ids), dtype=torch.long),
        "sam_pixel_values": sam_pixels(to_pil(frames[0]), processor.sam_size, processor.resize),
        "mllm_inputs": family.collate([inputs for inputs, _ in parts]),
        "image_size": frames[0].shape[:2],
    }


def seg_prompts(predictor, run: Run, keys: list[int], question: str) -> tuple[torch.Tensor, str]:
    """((K, C) [SEG] embeddings of the run's key frames, the answer) in the predictor's answer mode.

    teacher_forced: one pass over the prompt and the forced answer. generate: as the authors' `predict_forward`
    on a video, the answer is generated greedily on the key frames, and the [SEG] states are those of the
    generated sequence (one pass over prompt + answer up to its last [SEG]: the same states under causal
    attention, as for images in `Engine.generate`); an answer without [SEG] gives no embedding (empty masks).
    """
    model = predictor.model
    generate = predictor.mode == "generate"
    answer = None if generate else predictor.answer_text
    features = encode_key_frames(predictor.processor, [run.frames[k] for k in keys], question, answer)
    batch = predictor.processor.collate([features])
    if predictor.device_map is None:
        batch = to_device(batch, predictor.device)
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if generate:
        answer, sequence = predictor.engine("generate").generate_one(input_ids[0], batch["mllm_inputs"])
        if sequence is None:
            return torch.zeros((0, model.grounding.sam.config.prompt_encoder_config.hidden_size)), answer
        input_ids = sequence[None].to(input_ids.device)
        attention_mask = torch.ones_like(input_ids)
    hidden = model.decoder_states(input_ids, attention_mask, batch["mllm_inputs"])
    prompts, _ = model.seg_embeddings(hidden, input_ids)
    return prompts, answer


def _frame_source(run: Run, size: int, frames_on: str, device: torch.device, resize: str = "pil"):
    """frame index -> (3, S, S) uint8 SAM-2 input; resized on demand (cpu) or all at once on the GPU (gpu), by
    `resize` (pil | torch, the predictor's)."""
    if frames_on == "gpu":
        stacked = torch.stack([sam_pixels(to_pil(f), size, resize) for f in run.frames]).to(device)
        return lambda i: stacked[i]
    pin = device.type == "cuda"

    def frame(i: int) -> torch.Tensor:
        pixels = sam_pixels(to_pil(run.frames[i]), size, resize)
        return pixels.pin_memory() if pin else pixels

    return frame


@torch.inference_mode()
def predict_run(
    predictor,
    run: Run,
    prompt: str,
    key_frames: int = 5,
    key_frame_mode: str = "first",
    frames_on: str = "cpu",
    on_frame: Callable[[int], None] | None = None,
) -> RunPrediction:
    """Masks for every frame of `run` (see the module docstring); `on_frame(t)` is called as frame t is done
    (progress, memory probes)."""
    reason = tracking_unsupported(predictor.model.grounding)
    if reason is not None:  # before the MLLM pass: no run of this model can be tracked
        raise ConfigError(reason)
    if key_frame_mode not in KEY_FRAME_MODES or frames_on not in FRAMES_ON or key_frames < 1:
        raise ConfigError(
            f"key_frames={key_frames} (>= 1), key_frame_mode={key_frame_mode!r} ({KEY_FRAME_MODES}), "
            f"frames_on={frames_on!r} ({FRAMES_ON})"
        )
    model = predictor.model
    grounding = model.grounding
    count, height, width = run.frames.shape[:3]
    keys = key_frame_indices(count, key_frames, key_frame_mode)
    started = time.perf_counter()
    prompts, answer = seg_prompts(predictor, run, keys, prompt)
    mllm_seconds = time.perf_counter() - started
    masks = np.zeros((count, height, width), dtype=bool)
    means = [float("nan")] * count
    if prompts.shape[0]:
        device = next(grounding.sam.vision_encoder.parameters()).device
        frames = _frame_source(run, grounding.image_size, frames_on, device, predictor.processor.resize)
        tracker = Tracker(grounding, prompts, count, keys, frames)
        for t, logits in tracker:
            fg = mask_logits_at(logits, (height, width), grounding.image_size).sigmoid() > predictor.threshold
            masks[t] = fg.any(dim=0).cpu().numpy()
            means[t] = float(logits.float().mean())
            if on_frame is not None:
                on_frame(t)
    tracking_seconds = time.perf_counter() - started - mllm_seconds
    return RunPrediction(
        masks,
        answer,
        int(prompts.shape[0]),
        keys,
        means,
        {"mllm": mllm_seconds, "tracking": tracking_seconds},
    )
