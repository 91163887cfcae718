"""Several targets per image: one question per target, all (images x targets) rows in one batched pass.

`targets=` names what to segment, a mapping name -> prompt (`{artery: "Please segment the arteries.", vein:
...}`), a list of names (each asked with the data's first per-object phrasing, "Please segment the {phrase} in
this image."), or the path of a YAML file holding either. Every image is asked each target's question in a
sequence of its own, as the authors' RefCOCO evaluation asks one question per object: a single answer with
several [SEG] would need a model trained to answer that way, which Sa2VA's released and vseg's fine-tuned ones
are not. The rows of one batch are image-major (image 0: targets in order, image 1: ...). Each image is encoded
once: the MLLM's vision encoder (InternVL: tower + projector; Qwen-VL: the visual model with its mergers) gives
its embeddings, which are scattered into every target row's placeholders (`MLLMFamily.decoder_states` with
`row_image`), and SAM-2 encodes it once for the mask decoder; only the LLM and the mask decoder run per row. So N
targets cost one vision pass and one SAM-2 pass per image plus N LLM rows. (With `answer=generate`, generation
itself runs one row at a time with the row's image, as single-prompt generation does.)

Ground truth: a target's mask is the union of the image's objects whose name (COCO category, polygon text,
compared without case) equals the target name; an image without such an object has an empty truth. A target
whose name no object of the dataset carries has no ground truth and is not scored.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image, ImageDraw, ImageFont

from vseg.config import ConfigError, DataConfig
from vseg.data.records import load_sample
from vseg.inference.engine import Engine, ItemPrediction
from vseg.inference.inputs import PredictDataset, PredictItem, cut_after_seg, with_file_spacing
from vseg.model.processor import Sa2VAProcessor
from vseg.model.tokenizer import SEG_TOKEN

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.+-]{0,63}")
DEFAULT_OBJECT_PROMPT = "Please segment the {phrase} in this image."
#: overlay colours, in target order (distinct on grey angiograms and on red fundus images alike)
COLOURS = ((255, 40, 40), (40, 120, 255), (40, 220, 90), (255, 200, 0), (220, 60, 255), (0, 230, 230))


def name_key(name: str) -> str:
    """How target and object names are compared: case and repeated spaces ignored."""
    return " ".join(name.casefold().split())


def parse_targets(value: Any, data: DataConfig | None = None) -> dict[str, str] | None:
    """`targets=` as an ordered mapping name -> prompt; None when not given.

    Raises:
        ConfigError: what is wrong with which target, and the forms accepted.
    """
    if value is None:
        return None
    where = "targets"
    if isinstance(value, str | Path):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"targets={value}: no such file; give a YAML file, or inline targets='{{artery: \"Please segment "
                "the arteries.\", vein: null}}' or targets=[artery,vein]"
            )
        try:
            value = OmegaConf.load(path)
        except Exception as err:  # noqa: BLE001 - any YAML problem is the file's, told in one line
            raise ConfigError(f"targets={path}: not a readable YAML file ({type(err).__name__}: {err})") from None
        where = f"targets={path}"
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = dict.fromkeys(value)
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{where}: expected a non-empty mapping name -> prompt, or a list of names")
    phrasing = (data.object_prompts[0] if data is not None and data.object_prompts else None) or DEFAULT_OBJECT_PROMPT
    out: dict[str, str] = {}
    errors, seen = [], {}
    for name, prompt in value.items():
        name = str(name)
        if not NAME.fullmatch(name):
            errors.append(
                f"{name!r}: a target name is 1-64 letters, digits, spaces or _.+- and starts with a letter or "
                "digit (it names the folder masks/<target>/)"
            )
            continue
        if name_key(name) in seen:
            errors.append(f"{name!r} and {seen[name_key(name)]!r} name the same target (case is ignored)")
            continue
        seen[name_key(name)] = name
        if prompt is None:
            prompt = phrasing.format(phrase=name)
        if not isinstance(prompt, str) or not prompt.strip():
            errors.append(f"{name}: the prompt must be text (or null for {phrasing!r}), got {prompt!r}")
            continue
        if SEG_TOKEN in prompt:
            errors.append(f"{name}: the prompt is the question; {SEG_TOKEN} belongs in the answer")
            continue
        out[name] = prompt
    if errors:
        raise ConfigError(f"{where}:\n  - " + "\n  - ".join(errors))
    return out


def target_items(items: list[PredictItem]) -> list[PredictItem]:
    """One item per image: per-object items of one record (data.objects=per_object) collapse into one."""
    out: list[PredictItem] = []
    seen: set[str] = set()
    for item in items:
        key = item.record.id if item.record is not None else item.id
        if item.record is not None and key in seen:
            continue
        seen.add(key)
        out.append(
            PredictItem(
                index=len(out),
                id=key,
                prompt="",
                image_path=item.image_path,
                mask_path=item.mask_path,
                record=item.record,
                pixels=item.pixels,
                spacing=item.spacing,
                spacing_from=item.spacing_from,
            )
        )
    return out


def names_with_truth(items: list[PredictItem], targets: Mapping[str, str]) -> set[str]:
    """The targets some object of the dataset is named after (only those are scored)."""
    phrases = {name_key(o.phrase) for it in items if it.record is not None for o in it.record.objects if o.phrase}
    scored = {t for t in targets if name_key(t) in phrases}
    if any(it.record is not None for it in items):
        unscored = [t for t in targets if t not in scored]
        if unscored:
            log.warning(
                "targets %s name no object of the dataset (it has %s): predicted, not scored",
                unscored,
                sorted(phrases),
            )
    return scored


class TargetsDataset(PredictDataset):
    """Reads an image once and encodes one sequence per target; truths per target (see the module doc).

    Args:
        items: one per image (`target_items`).
        targets: name -> prompt.
        scored: the target names that have ground truth in the dataset.
    """

    def __init__(
        self,
        items: list[PredictItem],
        processor: Sa2VAProcessor,
        answer: str | None,
        data: DataConfig | None,
        targets: Mapping[str, str],
        scored: set[str],
    ):
        super().__init__(items, processor, answer, data)
        self.targets, self.scored = dict(targets), scored

    def truths(self, item: PredictItem) -> tuple[np.ndarray, dict[str, np.ndarray | None], np.ndarray | None]:
        if item.record is None:
            if item.mask_path is not None:
                raise ValueError(
                    f"{item.mask_path}: one ground-truth mask per image cannot be split into targets; give "
                    "per-target truth with data=coco or data=polygons"
                )
            image, _, fov = self.read(item)
            return image, dict.fromkeys(self.targets), fov
        data = self.data or DataConfig()
        sample = load_sample(item.record, None, data.aspect, data.holes)
        truths: dict[str, np.ndarray | None] = {}
        for name in self.targets:
            if name not in self.scored:
                truths[name] = None
                continue
            mask = np.zeros(sample.image.shape[:2], bool)
            for plane, phrase in zip(sample.masks, sample.phrases, strict=True):
                if phrase and name_key(phrase) == name_key(name):
                    mask |= plane
            truths[name] = mask
        return sample.image, truths, sample.fov

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = with_file_spacing(self.items[index])
        try:
            image, truths, fov = self.truths(item)
            rows = self.processor.encode_questions(image, list(self.targets.values()), self.answer, sample_id=item.id)
        except Exception as err:  # noqa: BLE001 - any unreadable input is recorded as failed, the run goes on
            return {"item": item, "error": f"{type(err).__name__}: {err}"}
        if self.answer is not None:
            seg_id = self.processor.tokenizer.convert_tokens_to_ids(SEG_TOKEN)
            rows = [cut_after_seg(dict(r), seg_id) for r in rows]
        return {"item": item, "rows": rows, "image": image, "truth": truths, "fov_mask": fov}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch of (images x targets) rows: text per row, image inputs and SAM-2 pixels per image, `row_image`
        between them (`mllm_single`: each row's image inputs, for generation, which asks one row at a time)."""
        ok = [s for s in samples if "error" not in s]
        batch: dict[str, Any] = {}
        if ok:
            rows = [r for s in ok for r in s["rows"]]
            input_ids, labels, attention_mask = self.processor.pad_text(rows)
            batch = {
                "ids": [r["id"] for r in rows],
                "input_ids": input_ids,
                "labels": labels,
                "attention_mask": attention_mask,
                "sam_pixel_values": torch.stack([s["rows"][0]["sam_pixel_values"] for s in ok]),
                # image inputs once per image: the vision encoder runs once per image (`row_image` says which)
                "mllm_inputs": self.processor.family.collate([s["rows"][0]["mllm_inputs"] for s in ok]),
                "image_sizes": [r["image_size"] for r in rows],
                "row_image": torch.arange(len(ok)).repeat_interleave(len(self.targets)),
            }
        batch["targets"] = list(self.targets)
        batch.setdefault("row_image", torch.zeros(0, dtype=torch.long))  # marks a targets batch, even an empty one
        batch["mllm_single"] = [r["mllm_inputs"] for s in ok for r in s["rows"]]
        for key in ("item", "image", "truth", "fov_mask"):
            batch[key + "s"] = [s[key] for s in ok]
        batch["failed"] = [(s["item"], s["error"]) for s in samples if "error" in s]
        return batch


def predict_targets(engine: Engine, batch: dict[str, Any]) -> list[dict[str, ItemPrediction]]:
    """Per image of a `TargetsDataset` batch, target name -> its prediction."""
    names, n_images = batch["targets"], len(batch["items"])
    if not n_images:
        return []
    row_image = batch["row_image"]
    if engine.mode == "teacher_forced":
        with torch.inference_mode():
            ids, attention = batch["input_ids"], batch["attention_mask"]
            logits = engine.seg_logits(ids, attention, batch, row_image=row_image)
            answers = [engine.answer] * len(logits)
            predictions = engine.finish(logits, [tuple(s) for s in batch["image_sizes"]], answers)
    else:
        # Generation runs one row at a time anyway; its final batched pass sees one SAM-2 image per row.
        sam = batch["sam_pixel_values"]
        predictions = engine({**batch, "sam_pixel_values": sam[row_image.to(sam.device)]})
    per = len(names)
    return [dict(zip(names, predictions[i * per : (i + 1) * per], strict=True)) for i in range(n_images)]


def overlay_targets(image: np.ndarray, masks: Mapping[str, np.ndarray]) -> np.ndarray:
    """The image with each target's mask blended in its colour, above a legend band (colour -> target name)."""
    out = image.astype(np.float32)
    for (_, mask), colour in zip(masks.items(), _cycle(len(masks)), strict=True):
        out[mask] = 0.45 * out[mask] + 0.55 * np.asarray(colour, np.float32)
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    font = ImageFont.load_default()
    size = 10
    pad, line = 4, size + 8
    # Lay the entries out left to right, wrapping to the image's width.
    measure = ImageDraw.Draw(picture)
    spots, x, y = [], pad, pad
    for name in masks:
        width = size + 4 + int(measure.textlength(name, font=font)) + 2 * pad
        if x > pad and x + width > picture.width:
            x, y = pad, y + line
        spots.append((x, y, name))
        x += width
    band = Image.new("RGB", (picture.width, y + line), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for (x, y, name), colour in zip(spots, _cycle(len(masks)), strict=True):
        draw.rectangle((x, y + 2, x + size, y + 2 + size), fill=colour)
        draw.text((x + size + 4, y), name, fill=(255, 255, 255), font=font)
    canvas = Image.new("RGB", (picture.width, picture.height + band.height))
    canvas.paste(picture, (0, 0))
    canvas.paste(band, (0, picture.height))
    return np.asarray(canvas)


def _cycle(n: int) -> list[tuple[int, int, int]]:
    return [COLOURS[i % len(COLOURS)] for i in range(n)]
