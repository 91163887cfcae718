"""Small-batch latency (what one served request sees): CUDA graphs over the compiled blocks, static token lengths.

At batch 1 a Sa2VA forward is a few thousand small kernels, and the GPU waits on Python launching them. Two
measures, both options of the `Predictor` (so predict.py, `bench/` and the server get them alike):

* `compile_mode="reduce-overhead"`: the repeated blocks (`vseg.model.compile`) are compiled with inductor's
  CUDA graphs, so each block is one graph replay instead of tens of launches. Blocks of one class share one
  compiled graph, but each layer records its own CUDA graph (its weights live at other addresses); the
  re-record limit is raised for that. A new batch size or token length records new graphs once.
* `pad_tokens=N`: prompts are padded on the right to a multiple of N tokens, so prompts of different lengths
  reuse a few shapes instead of compiling and recording one per length. Right padding is exact for the
  fast path: attention is causal, so no real token (and no [SEG] state) sees a pad.

CUDA-graph outputs live in a pool that the next replay overwrites; the engine copies what it returns (masks to
the host, SAM-2 features through eager convolutions) before that, and `step_begin` tells the graph trees that
a new forward starts.
"""

from __future__ import annotations

from typing import Any

import torch

from vseg.config.predict import COMPILE_MODES  # inductor's default, CUDA graphs per block, autotuned kernels
from vseg.model.compile import allow_cuda_graphs, step_begin, uses_cuda_graphs  # shared with training

__all__ = ["COMPILE_MODES", "allow_cuda_graphs", "pad_tokens", "step_begin", "uses_cuda_graphs"]


def pad_tokens(batch: dict[str, Any], multiple: int, pad_id: int) -> dict[str, Any]:
    """The batch with `input_ids` / `attention_mask` (/ `labels`) padded on the right to a multiple of `multiple`.

    Pads get id `pad_id`, attention 0 and label -100. Only the text is padded: the image inputs keep their
    shapes (one 448-px tile per image for 512-px inputs).
    """
    ids = batch.get("input_ids")
    if multiple <= 1 or ids is None or not batch.get("items", True):
        return batch
    length = int(ids.shape[1])
    extra = -length % multiple
    if extra == 0:
        return batch
    padded = dict(batch)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    for key, value in fill.items():
        if key in batch:
            tensor = batch[key]
            tail = torch.full((tensor.shape[0], extra), value, dtype=tensor.dtype, device=tensor.device)
            padded[key] = torch.cat([tensor, tail], dim=1)
    return padded
