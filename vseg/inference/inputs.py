"""What `input=` names, turned into an ordered list of items, and the dataset that reads them.

Forms: an image file; a folder (every image under it, recursively, sorted); a glob (`'scans/**/*.png'`); a list
file (`.txt` / `.lst` / `.list`: one image path per line, relative to the list's folder, optionally followed by a
tab and a ground-truth mask path; `#` comments); or a dataset config (`data=drive`, `data=polygons ...`, any
`vseg.data` source, read with `read_records` / `load_sample`, so ground truth and field-of-view masks come with
it). Without `input=` and `data=`, a run's own data is used (its `split`, validation by default).

Images are read at their own size; the model's processor resizes them for its two branches, and the mask is
brought back to the image's size. An input that cannot be read becomes a failed item with its reason; the
rest of the batch goes on.

Pixel size (millimetre distances), per image, first found wins: `pixel_spacing=` (the user's, for every input);
`data.pixel_spacing` for dataset inputs; a single-frame DICOM file's own spacing (`vseg.data.dicom.spacing_of`:
PixelSpacing, else ImagerPixelSpacing corrected by the stated magnification) for file inputs; else unknown (no
`_mm` scores). The user's value wins because it is the deliberate one: a calibrated spacing, or one that corrects
a detector spacing the file states without its magnification. Each record says which was used
(`pixel_spacing_mm`, `pixel_spacing_from`).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from vseg.config import ConfigError, DataConfig, parse_spacing
from vseg.data.dataset import expand, split_records
from vseg.data.dicom import DICOM_SUFFIXES, dicom_pixel_spacing
from vseg.data.io import is_image_file, read_image, read_mask
from vseg.data.records import load_sample
from vseg.data.sources import read_records
from vseg.model.preprocess import to_pil
from vseg.model.processor import Sa2VAProcessor
from vseg.model.tokenizer import SEG_TOKEN

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".lst", ".list")
DEFAULT_PROMPT = "Please segment the blood vessels in this image."


class InputError(ConfigError):
    """`input=` names nothing usable (missing path, empty folder, no glob match, bad list file)."""


@dataclass(frozen=True)
class PredictItem:
    """One input: where its pixels (and truth) come from and what to ask."""

    index: int  # position in the input order (results are merged in this order)
    id: str  # unique name; outputs are masks/<id>.png and overlays/<id>.png
    prompt: str
    image_path: str | None = None
    mask_path: str | None = None  # ground truth for file inputs (list files)
    record: Any = None  # a vseg.data VesselRecord for dataset inputs
    object_index: int | None = None  # per_object datasets: which object is the target
    spacing: tuple[float, float] | None = None  # (row, column) mm per pixel at the image's own size, if known
    pixels: Any = field(default=None, compare=False)  # an in-memory image (HxWx3 uint8 array or PIL image)
    spacing_from: str | None = None  # where `spacing` comes from (pixel_spacing=, data.pixel_spacing, DICOM field)

    @property
    def source(self) -> str:
        if self.image_path is not None:
            return self.image_path
        if self.pixels is not None:
            return f"<{type(self.pixels).__name__} {self.id}>"
        record = self.record
        return str(getattr(record, "image_path", None) or getattr(record, "id", self.id))


def _unique_ids(paths: list[Path], root: Path) -> list[str]:
    """Ids from paths relative to `root`, suffix dropped; clashes (a.png, a.jpg) keep their suffix."""
    rel = []
    for p in paths:
        try:
            rel.append(p.resolve().relative_to(root).as_posix())
        except ValueError:
            rel.append(p.name)
    stems = [r.rsplit(".", 1)[0] if "." in Path(r).name else r for r in rel]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [r.replace(".", "_") if counts[s] > 1 else s for r, s in zip(rel, stems, strict=True)]


def _common_root(paths: list[Path]) -> Path:
    parents = [str(p.resolve().parent) for p in paths]
    return Path(os.path.commonpath(parents)) if parents else Path.cwd()


def _from_files(
    images: list[Path], masks: list[str | None], root: Path, prompt: str, spacing: tuple[float, float] | None = None
) -> list[PredictItem]:
    ids = _unique_ids(images, root)
    return [
        PredictItem(index=i, id=ids[i], prompt=prompt, image_path=str(p), mask_path=masks[i], spacing=spacing)
        for i, p in enumerate(images)
    ]


def _read_list(path: Path) -> tuple[list[Path], list[str | None]]:
    images: list[Path] = []
    masks: list[str | None] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) > 2:
            raise InputError(f"{path}:{number}: expected `image` or `image<TAB>mask`, got {len(parts)} columns")
        image = Path(parts[0]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        mask = None
        if len(parts) == 2 and parts[1].strip():
            m = Path(parts[1].strip()).expanduser()
            mask = str(m if m.is_absolute() else path.parent / m)
        images.append(image)
        masks.append(mask)
    if not images:
        raise InputError(f"input={path}: the list file names no images")
    return images, masks


def file_items(
    spec: str, prompt: str, exclude: Path | None = None, spacing: tuple[float, float] | None = None
) -> list[PredictItem]:
    """Items for an image file, a folder, a glob or a list file (see the module docstring); `spacing`: mm/pixel."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            images, masks = _read_list(path)
            return _from_files(images, masks, _common_root(images), prompt, spacing)
        if not is_image_file(path):
            raise InputError(
                f"input={spec}: neither an image ({', '.join(sorted({'.png', '.jpg', '.tif', '.gif', '.bmp'}))}, ...) "
                f"nor a list file ({', '.join(LIST_SUFFIXES)})"
            )
        return _from_files([path], [None], path.resolve().parent, prompt, spacing)
    if path.is_dir():
        root = path.resolve()
        images = sorted(
            p
            for p in root.rglob("*")
            if p.is_file() and is_image_file(p) and not (exclude is not None and exclude in p.resolve().parents)
        )
        if not images:
            raise InputError(
                f"input={spec}: the folder holds no images (looked for {', '.join(('png', 'jpg', 'tif', 'gif', 'bmp', 'ppm'))} files, recursively)"
            )
        return _from_files(images, [None] * len(images), root, prompt, spacing)
    if glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        images = [p for p in matches if p.is_file() and is_image_file(p)]
        if not images:
            raise InputError(f"input={spec}: the pattern matches no image files ({len(matches)} paths matched)")
        return _from_files(images, [None] * len(images), _common_root(images), prompt, spacing)
    raise InputError(f"input={spec}: no such file or folder, and not a glob pattern")


def dataset_items(data: DataConfig, split: str, prompt: str | None) -> list[PredictItem]:
    """Items of a `vseg.data` source: all records, or one split of them (`train` / `val`)."""
    records = split_of(data, split)
    spacing = parse_spacing(data.pixel_spacing)
    items = []
    for i, item in enumerate(expand(records, data.objects)):
        if item.object_index is None:
            question = prompt or (data.prompts[0] if data.prompts else DEFAULT_PROMPT)
        else:
            objects = item.record.objects
            phrase = objects[item.object_index].phrase if item.object_index < len(objects) else None
            question = prompt or data.object_prompts[0].format(phrase=phrase or "blood vessels")
        items.append(
            PredictItem(
                index=i,
                id=item.id,
                prompt=question,
                record=item.record,
                object_index=item.object_index,
                spacing=spacing,
                spacing_from="data.pixel_spacing" if spacing is not None else None,
            )
        )
    if not items:
        raise InputError(f"data={data.name or data.source}: split {split} has no images")
    return items


def split_of(data: DataConfig, split: str) -> list[Any]:
    """The records of a `vseg.data` source: all of them, or one split (`train` / `val`)."""
    records = read_records(data)
    if split in ("train", "val"):
        train, val = split_records(records, data.split, data.seed)
        return train if split == "train" else val
    if split != "all":
        raise ConfigError(f"split={split!r}: expected val, train or all")
    return records


def with_file_spacing(item: PredictItem) -> PredictItem:
    """The item with its DICOM file's pixel spacing, when it has none yet (the module doc gives the order)."""
    if item.spacing is not None or item.image_path is None:
        return item
    if Path(item.image_path).suffix.lower() not in DICOM_SUFFIXES:
        return item
    found = dicom_pixel_spacing(item.image_path)
    if found is None:
        return item
    spacing, fields = found
    return dataclasses.replace(item, spacing=spacing, spacing_from=f"DICOM {fields}")


def cut_after_seg(features: dict[str, Any], seg_id: int) -> dict[str, Any]:
    """Causal attention: nothing after the last [SEG] changes its state, so it is not computed."""
    ids = features["input_ids"]
    last = int((ids == seg_id).nonzero().max()) + 1 if bool((ids == seg_id).any()) else len(ids)
    features["input_ids"], features["labels"] = ids[:last], features["labels"][:last]
    return features


class PredictDataset(Dataset):
    """Reads one item at its own size and encodes it for the model; failures are returned, not raised.

    Args:
        items: what to read.
        processor: the model's processor.
        answer: teacher-forced answer (contains [SEG]); None: the prompt ends where generation starts.
        data: the dataset config of dataset items (resizing rules for polygons, holes).
        pool: threads that resize for SAM-2 while the reading thread tiles (`Sa2VAProcessor.encode`); a server
            answering one request at a time uses it, a loader with a worker per core does not need it.
    """

    def __init__(
        self,
        items: list[PredictItem],
        processor: Sa2VAProcessor,
        answer: str | None,
        data: DataConfig | None = None,
        pool: Executor | None = None,
    ):
        self.items = items
        self.processor = processor
        self.answer = answer
        self.data = data
        self.pool = pool

    def __len__(self) -> int:
        return len(self.items)

    def read(self, item: PredictItem) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(image HxWx3 uint8, truth HxW bool or None, field of view HxW bool or None) at the image's size."""
        if item.record is not None:
            data = self.data or DataConfig()
            sample = load_sample(item.record, None, data.aspect, data.holes)
            has_truth = bool(item.record.objects) or item.record.synthetic is not None
            truth = None
            if has_truth:
                truth = sample.masks.any(axis=0) if item.object_index is None else sample.masks[item.object_index]
            return sample.image, truth, sample.fov
        image = np.asarray(to_pil(item.pixels)) if item.pixels is not None else read_image(item.image_path or "")
        truth = None
        if item.mask_path is not None:
            truth = read_mask(item.mask_path)
            if truth.shape != image.shape[:2]:
                raise ValueError(
                    f"mask {item.mask_path} is {truth.shape[1]}x{truth.shape[0]} but the image is "
                    f"{image.shape[1]}x{image.shape[0]}"
                )
        return image, truth, None

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = with_file_spacing(self.items[index])
        try:
            image, truth, fov = self.read(item)
            features = self.processor.encode(image, item.prompt, self.answer, sample_id=item.id, pool=self.pool)
        except Exception as err:  # noqa: BLE001 - any unreadable input is recorded as failed, the run goes on
            return {"item": item, "error": f"{type(err).__name__}: {err}"}
        if self.answer is not None:
            cut_after_seg(features, self.processor.tokenizer.convert_tokens_to_ids(SEG_TOKEN))
        features.update(item=item, image=image, truth=truth, fov_mask=fov)
        return features

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """The loader's `collate_fn` for this dataset."""
        return collate(self.processor, samples)


def collate(processor: Sa2VAProcessor, samples: list[dict[str, Any]], pin: bool = False) -> dict[str, Any]:
    """A model batch of the readable samples plus per-item extras; unreadable ones go to `failed`.

    `pin`: the images are stacked into page-locked memory (`Sa2VAProcessor.collate`), for a CUDA model.
    """
    ok = [s for s in samples if "error" not in s]
    failed = [(s["item"], s["error"]) for s in samples if "error" in s]
    extras = ("item", "image", "truth", "fov_mask")
    batch: dict[str, Any] = {}
    if ok:
        batch = processor.collate([{k: v for k, v in s.items() if k not in extras} for s in ok], pin)
    for key in extras:
        batch[key + "s"] = [s[key] for s in ok]
    batch["mllm_single"] = [s["mllm_inputs"] for s in ok]  # per-sample image inputs (generation)
    batch["failed"] = failed
    return batch
