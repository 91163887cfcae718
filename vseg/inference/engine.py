"""The prediction pass: a batch of encoded inputs -> one mask per input at the input's own size, and the answer.

Fast path (`answer_mode=teacher_forced`): the prompt is followed by the answer "It is [SEG]" (the run's
`data.answer`, cut after its last [SEG]); one batched forward gives the last-layer state at every [SEG]
input position, exactly the state a model that generated that answer would have (attention is causal), so
no token-by-token generation runs. `answer_mode=generate`: greedy generation (KV cache, up to `max_new_tokens`,
one prompt at a time) gives free text; the prompt plus the generated tokens then go through the same
batched pass, so the masks equal the fast path's whenever the generated tokens equal the teacher-forced
ones. Several [SEG] in one answer: their masks are merged (union); none: an empty mask.

Every tensor is moved to the device of the part that uses it (`Sa2VA` and `SamGrounding` do that, and
accelerate's hooks do it inside split models), so the same code serves one device and a `device_map`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vseg.model.families import embedding_device
from vseg.model.grounding import mask_logits_at
from vseg.model.sa2va import Sa2VA
from vseg.model.tokenizer import SEG_TOKEN, get_template, token_id

MODES = ("teacher_forced", "generate")


@dataclass
class ItemPrediction:
    """What the model said about one input."""

    mask: np.ndarray  # HxW bool at the input's own size
    answer: str  # the teacher-forced answer, or the generated text
    seg_tokens: int  # [SEG] tokens in the answer (masks merged)
    mean_logit: float  # mean of the low-res logits (nan without [SEG]); a cheap fingerprint of the pass
    # HxW float32 foreground probability (max over the [SEG] masks), only when asked for: it lets a caller
    # move the threshold (mask == probability > threshold) without running the model again
    probability: np.ndarray | None = None


@dataclass
class LoopTimes:
    """Where a prediction loop's wall time went: waiting for (and moving) inputs, the model, writing results.

    The model's share includes the GPU work: its masks are copied to the host before it returns. A loop
    whose `inputs` share is large needs more `num_workers`; a large `writing` share, more `writer_threads`.
    """

    seconds: dict[str, float] = field(default_factory=lambda: {"inputs": 0.0, "model": 0.0, "writing": 0.0})
    _mark: float = field(default=0.0, init=False, repr=False)

    @contextmanager
    def measure(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(part, time.perf_counter() - start)

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds

    def start(self) -> None:
        """Starts the lap clock (loops timed by hooks at part boundaries rather than by `measure`)."""
        self._mark = time.perf_counter()

    def lap(self, part: str) -> None:
        """Counts the time since the last `start` or `lap` towards `part`."""
        now = time.perf_counter()
        self.add(part, now - self._mark)
        self._mark = now

    def report(self) -> dict[str, float]:
        """`seconds_<part>` for the summary."""
        return {f"seconds_{part}": round(value, 3) for part, value in self.seconds.items()}

    def describe(self) -> str:
        total = sum(self.seconds.values())
        if total <= 0:
            return ""
        names = {"inputs": "waiting for inputs", "model": "model", "writing": "writing results"}
        return ", ".join(f"{names.get(k, k)} {100 * v / total:.0f} %" for k, v in self.seconds.items())


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its model tensors on `device` (non-blocking from pinned memory)."""
    if not batch.get("items"):
        return batch
    moved = dict(batch)
    for key in ("input_ids", "attention_mask", "labels", "sam_pixel_values"):
        if key in moved:
            moved[key] = moved[key].to(device, non_blocking=True)
    moved["mllm_inputs"] = {k: v.to(device, non_blocking=True) for k, v in batch["mllm_inputs"].items()}
    return moved


def synchronize(tensors: list[torch.Tensor]) -> None:
    """Waits for the GPU work behind `tensors` (on every CUDA device they live on); nothing on the CPU."""
    for index in sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"}):
        torch.cuda.synchronize(index)


class Engine:
    """Runs the model on batches from `vseg.inference.inputs.collate`.

    Args:
        model: the Sa2VA to run (eval mode; on one device or dispatched over several).
        tokenizer: its tokenizer.
        template: its chat template name (stop words for generation).
        mode: teacher_forced | generate.
        answer: the teacher-forced answer text (reported as the answer in that mode).
        max_new_tokens: generation budget.
        threshold: sigmoid threshold of the mask.
    """

    def __init__(
        self,
        model: Sa2VA,
        tokenizer: Any,
        template: str,
        mode: str = "teacher_forced",
        answer: str = "It is [SEG].",
        max_new_tokens: int = 32,
        threshold: float = 0.5,
    ):
        if mode not in MODES:
            raise ValueError(f"answer={mode!r}: expected one of {MODES}")
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        self.answer, self.max_new_tokens, self.threshold = answer, max_new_tokens, threshold
        self.seg_id = token_id(tokenizer, SEG_TOKEN)
        stops = [tokenizer.convert_tokens_to_ids(w) for w in get_template(template).stop_words]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.stop_ids = sorted({int(i) for i in [*stops, *eos] if i is not None and i != tokenizer.unk_token_id})
        self.stop_words = get_template(template).stop_words
        self.sam_size = model.grounding.image_size

    @torch.inference_mode()
    def __call__(
        self, batch: dict[str, Any], probability: bool = False, times: dict[str, float] | None = None
    ) -> list[ItemPrediction]:
        """Predictions for a collated batch; `times` (if given) gets `forward_ms` (the model up to the low-res
        logits, waited for) and `finish_ms` (masks at the images' sizes on the host, probability maps)."""
        items = batch["items"]
        if not items:
            return []
        start = time.perf_counter()
        sizes = [tuple(s) for s in batch["image_sizes"]]
        if self.mode == "teacher_forced":
            logits = self.seg_logits(batch["input_ids"], batch["attention_mask"], batch)
            answers = [self.answer] * len(items)
        else:
            answers, logits = self.generate(batch)
        if times is None:
            return self.finish(logits, sizes, answers, probability)
        synchronize(logits)  # finish waits for the GPU anyway; waiting here first splits the two times
        mark = time.perf_counter()
        out = self.finish(logits, sizes, answers, probability)
        times["forward_ms"], times["finish_ms"] = 1000 * (mark - start), 1000 * (time.perf_counter() - mark)
        return out

    def finish(
        self,
        logits: list[torch.Tensor],
        sizes: list[tuple[int, int]],
        answers: list[str],
        probability: bool = False,
    ) -> list[ItemPrediction]:
        """Per input (K, h, w) low-res logits -> its mask at its own size (union over the K [SEG] masks).

        The logits reach the image size as the authors' code takes them there (`mask_logits_at`).

        Inputs of one size are upsampled, thresholded and copied to the host together: one device sync per
        distinct size instead of one per input (and per statistic).
        """
        out: list[ItemPrediction | None] = [None] * len(logits)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (lg, size) in enumerate(zip(logits, sizes, strict=True)):
            if int(lg.shape[0]) == 0:
                none = np.zeros(size, dtype=np.float32) if probability else None
                out[i] = ItemPrediction(np.zeros(size, dtype=bool), answers[i], 0, float("nan"), none)
            else:
                groups.setdefault(size, []).append(i)
        for size, rows in groups.items():
            counts = [int(logits[i].shape[0]) for i in rows]
            stacked = torch.cat([logits[i] for i in rows]).float()  # (sum K, h, w)
            prob = mask_logits_at(stacked, size, self.sam_size).sigmoid()
            fg = prob > self.threshold
            count_t = torch.tensor(counts, device=fg.device)
            owner = torch.repeat_interleave(torch.arange(len(rows), device=fg.device), count_t)
            hits = torch.zeros((len(rows), *size), dtype=torch.int32, device=fg.device)
            masks = hits.index_add_(0, owner, fg.to(torch.int32)) > 0  # union of each input's K masks
            sums = torch.zeros(len(rows), device=fg.device).index_add_(0, owner, stacked.flatten(1).mean(1))
            means = (sums / count_t).tolist()
            host = masks.cpu().numpy()
            probs = None
            if probability:  # union of masks == max of probabilities over the threshold
                starts = [sum(counts[:j]) for j in range(len(rows))]
                top = torch.stack([prob[a : a + k].amax(0) for a, k in zip(starts, counts, strict=True)])
                probs = top.cpu().numpy()
            for j, i in enumerate(rows):
                out[i] = ItemPrediction(host[j], answers[i], counts[j], means[j], None if probs is None else probs[j])
        return out  # type: ignore[return-value]  # every slot is filled above

    def seg_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        batch: dict[str, Any],
        rows: list[int] | None = None,
        row_image: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Per sample (K, h, w) low-res logits of its [SEG] tokens; `rows` picks samples of `batch` for the images.

        `row_image` (several targets per image): which of the batch's images each sample asks about (the batch's
        image inputs are then per image); each image goes through the vision encoder and SAM-2 once, and its
        embeddings and features serve every sample that refers to it.
        """
        model = self.model
        mllm_inputs = (
            batch["mllm_inputs"] if rows is None else model.family.collate([batch["mllm_single"][r] for r in rows])
        )
        sam_pixels = batch["sam_pixel_values"] if rows is None else batch["sam_pixel_values"][rows]
        prompts, sample_index, features = self.seg_prompts(
            input_ids, attention_mask, mllm_inputs, sam_pixels, row_image
        )
        image_index = sample_index if row_image is None else row_image.to(sample_index.device)[sample_index]
        logits = model.grounding.decode(features, prompts, image_index)
        sample_index = sample_index.to(logits.device)
        return [logits[sample_index == i] for i in range(input_ids.shape[0])]

    def seg_prompts(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mllm_inputs: dict[str, Any],
        sam_pixels: torch.Tensor,
        row_image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(projected [SEG] embeddings (N, C), their sample index (N,), SAM-2 features): the mask decoder's inputs.

        Refinement by clicks keeps these and runs only the mask decoder again (`Predictor.refine`). `row_image`:
        the samples share the images of `mllm_inputs` / `sam_pixels` (see `seg_logits`).
        """
        model = self.model
        hidden = model.decoder_states(input_ids, attention_mask, mllm_inputs, row_image)
        # The SAM-2 encoder is queued before `seg_embeddings`, whose [SEG] lookup waits for the GPU: the host then
        # launches the encoder while the LLM still runs instead of leaving the GPU idle in between.
        features = model.grounding.encode(sam_pixels)
        prompts, sample_index = model.seg_embeddings(hidden, input_ids)
        return prompts, sample_index, features

    # ---------------------------------------------------------------- generation
    def _generate_kwargs(self, input_ids: torch.Tensor, inputs: dict[str, Any]) -> dict[str, Any]:
        """The MLLM's `generate` inputs for one prompt (its family's image inputs, placed and typed)."""
        mllm = self.model.base_mllm
        device = embedding_device(mllm)
        input_ids = input_ids.to(device)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            **self.model.family.generate_inputs(mllm, input_ids, inputs),
        }

    def generate_one(self, prompt: torch.Tensor, mllm_inputs: dict[str, Any]) -> tuple[str, torch.Tensor | None]:
        """Greedy answer to one prompt (1-D token ids) with its image inputs: (the answer text, the prompt plus
        the answer's tokens up to its last [SEG] on the CPU, or None when it has no [SEG])."""
        out = self.model.base_mllm.generate(
            **self._generate_kwargs(prompt[None], mllm_inputs),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=self.stop_ids or None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new = out[0, prompt.shape[0] :].cpu()
        stop = [j for j, t in enumerate(new.tolist()) if t in self.stop_ids]
        new = new[: stop[0]] if stop else new
        answer = self.tokenizer.decode(new, skip_special_tokens=False).strip()
        seg = (new == self.seg_id).nonzero()
        # Tokens after the last [SEG] cannot change its state (causal attention): cut them.
        return answer, torch.cat([prompt.cpu(), new[: int(seg.max()) + 1]]) if len(seg) else None

    def generate(self, batch: dict[str, Any]) -> tuple[list[str], list[torch.Tensor]]:
        """Greedy answers, then the masks of their [SEG] tokens from one batched pass over prompt + answer."""
        pad = self.tokenizer.pad_token_id
        sequences, answers = [], []
        for i, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
            answer, sequence = self.generate_one(batch["input_ids"][i, : int(length)], batch["mllm_single"][i])
            answers.append(answer)
            sequences.append(sequence)
        logits: list[torch.Tensor | None] = [None] * len(sequences)
        rows = [i for i, s in enumerate(sequences) if s is not None]
        if rows:
            length = max(int(sequences[r].shape[0]) for r in rows)
            ids = torch.full((len(rows), length), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : sequences[r].shape[0]] = sequences[r]
                mask[j, : sequences[r].shape[0]] = 1
            for j, lg in enumerate(self.seg_logits(ids, mask, batch, rows)):
                logits[rows[j]] = lg
        size = self.model.grounding.low_res_size
        empty = torch.zeros((0, size, size))
        return answers, [lg if lg is not None else empty for lg in logits]
