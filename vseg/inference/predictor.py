"""`Predictor`: a Sa2VA loaded once for inference, the one object under every front door.

`predict.py` (one device, data-parallel ranks, model-parallel), `bench/` and Python code all load a model
through `Predictor.load` and run it through the same `Engine`, so a mask is computed one way everywhere::

    from vseg import Predictor

    predictor = Predictor.load("runs/2026-11-29_tiny")          # any ckpt= form predict.py accepts
    results = predictor.predict(["scan.png", pil_image, array], prompts="Please segment the blood vessels.")
    results[0].mask            # HxW bool at the input's own size
    results[0].answer          # the answer text ("It is [SEG]." or generated with answer="generate")

    # several targets: one question each, all asked in one batched pass; per image, target -> prediction
    per_image = predictor.predict(images, targets={"artery": "Please segment the arteries.", "vein": None})
    per_image[0]["artery"].mask

Loading: the checkpoint form is resolved (`vseg.artifacts.sources`), the weights are read in the dtype
inference runs in, LoRA and trained token rows are merged into the base (`merge_lora`), and the model is
placed on one device or split by `device_map` (+ `max_memory`); `compile=True` compiles its repeated blocks
(`compile_mode="reduce-overhead"`: as CUDA graphs, for small batches; `vseg.inference.latency`), and `fp8=True`
runs the frozen matmuls in float8 on Hopper / Ada GPUs (`vseg.inference.quantize`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vseg.artifacts.adapters import merge_adapters
from vseg.artifacts.sources import ModelSource, preset, resolve_source
from vseg.config import ConfigError, DataConfig, ModelConfig
from vseg.data.io import read_image
from vseg.data.runs import Run, frame_names, read_run
from vseg.inference import latency
from vseg.inference.engine import MODES, Engine, ItemPrediction, to_device
from vseg.inference.inputs import DEFAULT_PROMPT, InputError, PredictDataset, PredictItem
from vseg.inference.placement import DEVICE_MAPS, dispatch, plan_device_map, resolve_device
from vseg.inference.quantize import FP8_PARTS, check_fp8_device, quantize_fp8
from vseg.inference.refine import refine as refine_by_clicks
from vseg.inference.targets import TargetsDataset, names_with_truth, parse_targets, predict_targets
from vseg.inference.video import predict_run
from vseg.model.build import DTYPES
from vseg.model.compile import compile_blocks
from vseg.model.preprocess import RESIZE_METHODS, to_pil
from vseg.model.processor import Sa2VAProcessor
from vseg.model.random_init import build_meta, materialize_random
from vseg.model.sa2va import Sa2VA

DEFAULT_ANSWER = "It is [SEG]."
ImageInput = str | Path | np.ndarray | Image.Image


def inference_dtype(dtype: str, source: ModelSource, device: torch.device) -> str:
    """`dtype=auto`: bfloat16 on GPUs, the checkpoint's own dtype on CPU; anything else as asked."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ConfigError(f"dtype={dtype!r}: expected auto or one of {sorted(DTYPES)}")
        return dtype
    return "bfloat16" if device.type == "cuda" else source.model_cfg.dtype


def _prepare(model: Sa2VA, merge_lora: bool, dtype: torch.dtype) -> Sa2VA:
    """Frozen, eval mode, adapters folded into the base (one matmul per layer instead of three), in `dtype`."""
    if merge_lora and hasattr(model.mllm, "merge_and_unload"):
        merge_adapters(model)
    model.requires_grad_(False)
    return model.to(dtype).eval()


class Predictor:
    """A model ready for inference with its tokenizer, processor and answer settings.

    Build it with `Predictor.load` (or `from_source`). `predict` takes images from Python; front doors that
    stream many inputs (predict.py) build their loader from `dataset` and call the predictor on each batch.
    """

    def __init__(
        self,
        source: ModelSource,
        model: Sa2VA,
        tokenizer: Any,
        processor: Sa2VAProcessor,
        *,
        device: torch.device,
        dtype: str,
        device_map: str | None = None,
        answer: str = "teacher_forced",
        answer_text: str | None = None,
        max_new_tokens: int = 32,
        threshold: float = 0.5,
        pad_tokens: int = 0,
    ):
        if answer not in MODES:
            raise ConfigError(f"answer={answer!r}: expected one of {MODES}")
        self.source, self.model, self.tokenizer, self.processor = source, model, tokenizer, processor
        self.device, self.dtype, self.device_map = device, dtype, device_map
        self.mode = answer
        self.answer_text = answer_text or (source.train_cfg.data.answer if source.train_cfg else DEFAULT_ANSWER)
        if "[SEG]" not in self.answer_text:
            raise ConfigError(f"answer_text={self.answer_text!r}: the teacher-forced answer needs a [SEG] token")
        self.max_new_tokens, self.threshold = max_new_tokens, threshold
        # text padded to a multiple of this (few distinct shapes for compiled / graphed blocks); CUDA-graph trees
        self.pad_tokens, self.cuda_graphs = pad_tokens, False
        self._engines: dict[str, Engine] = {}

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, ckpt: str | Path, *, model: str | ModelConfig | None = None, **options: Any) -> Predictor:
        """Loads `ckpt` (run directory, Lightning / DeepSpeed checkpoint, export, released folder, `random`).

        Args:
            ckpt: what `predict.py ckpt=` accepts.
            model: a `conf/model` preset name or ModelConfig (needed for `random`; optional for released folders).
            **options: of `from_source` (device, device_map, max_memory, dtype, compile, compile_mode, fp8,
                merge_lora, resize, answer, answer_text, max_new_tokens, threshold, pad_tokens).
        """
        if isinstance(model, str):
            model = preset(model)
        return cls.from_source(resolve_source(str(ckpt), model), **options)

    @classmethod
    def from_source(
        cls,
        source: ModelSource,
        *,
        device: str | torch.device = "auto",
        device_map: str | None = None,
        max_memory: dict[int | str, int | str] | None = None,
        dtype: str = "auto",
        compile: bool = False,
        merge_lora: bool = True,
        compile_mode: str = "default",
        fp8: bool | Sequence[str] = False,
        resize: str = "pil",
        **engine: Any,
    ) -> Predictor:
        """Builds the model of a resolved source on `device` (or split by `device_map` + `max_memory`).

        Args:
            compile_mode: with `compile`: default | reduce-overhead (CUDA graphs; pads text to 64 tokens unless
                `pad_tokens` says otherwise) | max-autotune-no-cudagraphs.
            fp8: float8 matmuls for the frozen parts (`vseg.inference.quantize.FP8_PARTS`, or a subset); needs a
                GPU of compute capability >= 8.9 and torchao.
            resize: how inputs are resized, pil (the authors' PIL bicubic) | torch (torch's antialiased bicubic on
                uint8 tensors: 2-3x faster on the CPU, within 1-2 grey levels; `vseg.model.preprocess`).
            engine: answer (teacher_forced | generate), answer_text, max_new_tokens, threshold, pad_tokens.
        """
        device = resolve_device(device) if isinstance(device, str) else device
        if device_map is not None and device_map not in DEVICE_MAPS:
            raise ConfigError(f"device_map={device_map!r}: expected one of {DEVICE_MAPS} or null")
        if compile and device_map is not None:
            raise ConfigError("compile=true compiles blocks on one device; it cannot be combined with device_map")
        if compile_mode not in latency.COMPILE_MODES:
            raise ConfigError(f"compile_mode={compile_mode!r}: expected one of {latency.COMPILE_MODES}")
        if resize not in RESIZE_METHODS:
            raise ConfigError(f"resize={resize!r}: expected one of {RESIZE_METHODS}")
        if fp8:  # checked before the model is built: no float8 GPU or no torchao fails at once
            if device_map is not None:
                raise ConfigError("fp8=true converts the model on one GPU; it cannot be combined with device_map")
            check_fp8_device(device)
        dtype_name = inference_dtype(dtype, source, device)
        torch_dtype = DTYPES[dtype_name]
        if source.form == "random":
            model, tokenizer = build_meta(dataclasses.replace(source.model_cfg, dtype=dtype_name))
            device_map_plan = {"": str(device)}
            if device_map is not None:
                device_map_plan = plan_device_map(model, device_map, max_memory, torch_dtype)
            materialize_random(model, device_map_plan, torch_dtype)
            if device_map is not None:
                model = dispatch(model, device_map_plan)
            model.eval()
        else:
            model, tokenizer = source.build("cpu", dtype_name)
            model = _prepare(model, merge_lora, torch_dtype)
            if device_map is None:
                model.to(device)
            else:
                model = dispatch(model, plan_device_map(model, device_map, max_memory, torch_dtype))
        max_length = source.train_cfg.data.max_length if source.train_cfg is not None else 4096
        cfg = dataclasses.replace(source.model_cfg, dtype=dtype_name)
        processor = Sa2VAProcessor.for_model(model, tokenizer, cfg, max_length, resize=resize)
        predictor = cls(
            source, model, tokenizer, processor, device=device, dtype=dtype_name, device_map=device_map, **engine
        )
        if fp8:
            predictor.to_fp8(None if fp8 is True else fp8)
        if compile:
            predictor.compile(compile_mode, pad_tokens="pad_tokens" not in engine)
        return predictor

    def to_fp8(self, parts: Sequence[str] | None = None) -> Any:
        """Converts the frozen linear layers of `parts` (default: all of `FP8_PARTS`) to float8, in place.

        Returns the `vseg.inference.quantize.Fp8Report`. Call it before `compile`.
        """
        if self.device_map is not None:
            raise ConfigError("fp8=true converts the model on one GPU; it cannot be combined with device_map")
        if self.dtype != "bfloat16":
            raise ConfigError(f"fp8=true starts from bfloat16 weights; dtype={self.dtype} (use dtype=auto)")
        return quantize_fp8(self.model, FP8_PARTS if parts is None else parts)

    def compile(self, mode: str = "default", pad_tokens: bool = True) -> Any:
        """Compiles the model's repeated blocks in place (`vseg.model.compile`); returns what was compiled.

        Args:
            mode: default | reduce-overhead (CUDA graphs per block, for small batches) | max-autotune-no-cudagraphs.
            pad_tokens: with CUDA graphs, pad text to a multiple of 64 tokens (few shapes to record) unless a
                multiple was set already.
        """
        if self.device_map is not None:
            raise ConfigError("compile=true compiles blocks on one device; it cannot be combined with device_map")
        if mode not in latency.COMPILE_MODES:
            raise ConfigError(f"compile_mode={mode!r}: expected one of {latency.COMPILE_MODES}")
        if latency.uses_cuda_graphs(mode):
            latency.allow_cuda_graphs()
            self.cuda_graphs = True
            if pad_tokens and self.pad_tokens <= 1:
                self.pad_tokens = 64
        return compile_blocks(self.model, None if mode == "default" else mode)

    # ------------------------------------------------------------------------------------------ running
    def engine(self, mode: str | None = None) -> Engine:
        """The `Engine` of answer mode `mode` (default: the predictor's), built once."""
        mode = mode or self.mode
        if mode not in self._engines:
            self._engines[mode] = Engine(
                self.model,
                self.tokenizer,
                self.source.template,
                mode=mode,
                answer=self.answer_text,
                max_new_tokens=self.max_new_tokens,
                threshold=self.threshold,
            )
        return self._engines[mode]

    def dataset(
        self,
        items: list[PredictItem],
        data: DataConfig | None = None,
        mode: str | None = None,
        targets: Mapping[str, str] | None = None,
    ):
        """The reading-and-encoding dataset of `items` for this model (teacher-forced answers cut after [SEG]).

        With `targets` (name -> prompt), items are images and each is asked every target's question
        (`vseg.inference.targets`); its `collate` builds the (images x targets) batches. Use `dataset.collate`
        as the loader's `collate_fn` either way.
        """
        teacher_forced = (mode or self.mode) == "teacher_forced"
        answer = self.answer_text if teacher_forced else None
        if targets:
            return TargetsDataset(items, self.processor, answer, data, targets, names_with_truth(items, targets))
        return PredictDataset(items, self.processor, answer, data)

    def __call__(
        self,
        batch: dict[str, Any],
        mode: str | None = None,
        probability: bool = False,
        times: dict[str, float] | None = None,
    ) -> list[ItemPrediction] | list[dict[str, ItemPrediction]]:
        """Predictions for one collated batch; its tensors go where the model needs them.

        A batch of a targets dataset gives, per image, a dict target name -> prediction. `probability=True`
        also returns each input's foreground probability map (to move the threshold later; not with targets).
        `times` (a dict) gets where the call's time went: `copy_ms` (inputs to the device), and from the engine
        `forward_ms` and `finish_ms` (not with targets).
        """
        start = time.perf_counter()
        if self.device_map is None:
            batch = to_device(batch, self.device)
            if times is not None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        if times is not None:
            times["copy_ms"] = 1000 * (time.perf_counter() - start)
        if self.pad_tokens > 1:
            batch = latency.pad_tokens(batch, self.pad_tokens, self.tokenizer.pad_token_id)
        if self.cuda_graphs:
            latency.step_begin()
        if "row_image" in batch:  # a TargetsDataset batch
            return predict_targets(self.engine(mode), batch)
        return self.engine(mode)(batch, probability, times)

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str] | None = None,
        answer: str | None = None,
        batch_size: int = 8,
        probability: bool = False,
        targets: Mapping[str, str | None] | Sequence[str] | None = None,
    ) -> list[ItemPrediction] | list[dict[str, ItemPrediction]]:
        """Masks for images given as paths, HxWx3 uint8 arrays or PIL images.

        Args:
            images: one image or a sequence of them.
            prompts: one prompt for all, one per image, or None (the default vessel prompt).
            answer: teacher_forced | generate (default: the predictor's).
            batch_size: images per forward pass.
            probability: also return each image's foreground probability map (`ItemPrediction.probability`).
            targets: name -> prompt (None: "Please segment the {name} in this image."), or a list of names;
                each image is asked every target's question, all in batched passes. Excludes `prompts`.

        Returns:
            Per image, in order: the mask at its own size, the answer text, the [SEG] count and mean logit; with
            `targets`, per image a dict target name -> that prediction.
        """
        single = isinstance(images, str | Path | np.ndarray | Image.Image)
        images = [images] if single else list(images)  # type: ignore[list-item]
        if targets is not None:
            if prompts is not None:
                raise ValueError("give prompts= or targets= (each target carries its own prompt), not both")
            parsed = parse_targets(targets)
            prompts = ""
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts or DEFAULT_PROMPT] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images: give one, or one per image")
        items = [
            PredictItem(i, f"input{i}", p, image_path=str(x))
            if isinstance(x, str | Path)
            else PredictItem(i, f"input{i}", p, pixels=x)
            for i, (x, p) in enumerate(zip(images, prompts, strict=True))
        ]
        dataset = self.dataset(items, mode=answer, targets=parsed if targets is not None else None)
        out: list[Any] = []
        for start in range(0, len(items), max(1, batch_size)):
            batch = dataset.collate([dataset[i] for i in range(start, min(start + batch_size, len(items)))])
            if batch["failed"]:
                item, error = batch["failed"][0]
                raise InputError(f"image {item.index} ({item.source}): {error}")
            out.extend(self(batch, answer, probability))
        return out

    def predict_video(
        self,
        video: str | Path | np.ndarray | Sequence[ImageInput],
        prompt: str | None = None,
        key_frames: int = 5,
        key_frame_mode: str = "first",
        frames_on: str = "cpu",
    ):
        """Masks for every frame of a run, tracked with SAM-2's memory (`vseg.inference.video`).

        Args:
            video: a video file, multi-frame DICOM, GIF / TIFF stack or folder of frames; a (T, H, W, 3) uint8
                array; or a sequence of frames (paths, arrays, PIL images) of one size.
            prompt: the question (default: the vessel prompt).
            key_frames: how many frames the MLLM sees (the authors: 5).
            key_frame_mode: first | uniform (spread over the run).
            frames_on: cpu (frames streamed to the GPU one at a time) | gpu (all kept there).

        Returns:
            A `RunPrediction`: (T, H, W) masks, the answer, the key frames, per-frame mean logits.
        """
        if isinstance(video, str | Path):
            run = read_run(video)
        else:
            frames = (
                video
                if isinstance(video, np.ndarray)
                else np.stack([read_image(f) if isinstance(f, str | Path) else np.asarray(to_pil(f)) for f in video])
            )
            run = Run("video", "<frames>", np.ascontiguousarray(frames, dtype=np.uint8), frame_names(len(frames)))
        return predict_run(self, run, prompt or DEFAULT_PROMPT, key_frames, key_frame_mode, frames_on)

    # ------------------------------------------------------------------------------------------ refining
    @torch.inference_mode()
    def refine(
        self,
        image: np.ndarray,
        prompt: str | None = None,
        points: Sequence[Sequence[float]] = (),
        labels: Sequence[int] = (),
    ) -> ItemPrediction:
        """The mask of `image` for `prompt`, corrected by clicks: SAM-2's prompt encoder gets the points next to
        the [SEG] embedding, as SAM-2 takes clicks next to a box.

        The MLLM pass ([SEG] embedding) and the SAM-2 image encoding run once per (image, prompt) and are kept
        (a few entries), so each further click costs one mask-decoder pass (`vseg.inference.refine`). No
        points: the plain prediction.

        Args:
            image: HxWx3 uint8.
            prompt: the question (default: the vessel prompt).
            points: clicks as (x, y) in the image's pixels.
            labels: per click, 1 = vessel here, 0 = not vessel here.

        Returns:
            The prediction with its `probability` map (teacher-forced answer).
        """
        return refine_by_clicks(self, self.__dict__.setdefault("_refine_cache", {}), image, prompt, points, labels)
