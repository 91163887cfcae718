"""Disk the feature cache (`feature_cache.*`) takes: per image x training images x augmented variants.

Per image, from the model config alone (no build): SAM-2 keeps its three FPN maps (the size
`sam_cache_bytes` computes, ~45 MB for Hiera-L at 1024 px in bf16); InternVL's vision part keeps, per tile,
(tile / patch)^2 tokens x the tower's width (pixel shuffle regroups them), for the tiles InternVL cuts from
a `data.image_size` square (`tile_grid`, + the thumbnail when more than one), or for the worst case of
`max_tiles` tiles when images keep their own sizes (then the size is an upper bound). Entries are stored in
the dtype the encoders run in; a safetensors header adds a few hundred bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from vseg.config import TrainConfig
from vseg.model.preprocess import tile_grid

GB = 2**30


def feature_dtype_bytes(cfg: TrainConfig) -> int:
    """Bytes per element of the cached features: the half dtype under DeepSpeed's bf16/fp16 or `*-true`
    precision (parameters cast), the model dtype otherwise."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    half = precision.split("-")[0] in ("bf16", "16")
    if half and (cfg.strategy.stage > 0 or precision.endswith("-true")):
        return 2
    return 4 if cfg.model.dtype == "float32" else 2


def sam_bytes_per_image(cfg: TrainConfig) -> float:
    from vseg.model.build import sam2_config  # lazy: the planner's disk sums need no model code otherwise

    vision = sam2_config(cfg.model.sam2).vision_config
    pixels = sum(int(h) * int(w) for h, w in vision.backbone_feature_sizes)
    return float(vision.fpn_hidden_size * pixels * feature_dtype_bytes(cfg))


def vision_bytes_per_image(cfg: TrainConfig) -> float:
    """InternVL only (the Qwen-VL towers are not cached): 0 for other families."""
    if cfg.model.family != "internvl":
        return 0.0
    from transformers import InternVLVisionConfig

    vision = InternVLVisionConfig(**cfg.model.vision)
    size = vision.image_size[0] if isinstance(vision.image_size, list | tuple) else vision.image_size
    patch = vision.patch_size[0] if isinstance(vision.patch_size, list | tuple) else vision.patch_size
    tiles = internvl_tiles_per_image(cfg, int(size))
    return float(tiles * (int(size) // int(patch)) ** 2 * vision.hidden_size * feature_dtype_bytes(cfg))


def internvl_tiles_per_image(cfg: TrainConfig, tile: int) -> int:
    """Tiles (thumbnail included) of every training image resized to `data.image_size`; without a size, the most
    any image can have."""
    most = cfg.model.max_tiles
    if cfg.data.image_size is None:
        return 1 if most == 1 else most + 1
    cols, rows = tile_grid(cfg.data.image_size, cfg.data.image_size, tile, 1, most)
    return cols * rows + (1 if cols * rows > 1 else 0)


@dataclass
class CacheSize:
    """The disk feature cache of a config: bytes per image per part, images, variants."""

    per_image: dict[str, float]
    images: int | None  # distinct training images (None: the data could not be read)
    variants: int  # encoder inputs per image: the fixed augmented variants, or 1
    exact: bool = True  # False: an upper bound (images keep their sizes: the most tiles InternVL can cut)
    batches_in_flight: int = 1  # batches the loader holds in host memory at once (workers x prefetch, + one)
    batch_size: int = 1

    @property
    def in_flight(self) -> float:
        """Host RAM per rank that the loader's batches of cached features hold (shared memory, then pinned):
        measured 27 GB of process RSS at 8 workers x micro-batch 32 on Sa2VA-4B (BENCHMARKS.md)."""
        return sum(self.per_image.values()) * self.batch_size * self.batches_in_flight

    @property
    def total(self) -> float | None:
        return None if self.images is None else sum(self.per_image.values()) * self.images * self.variants

    def line(self, enabled: bool) -> str:
        parts = " + ".join(f"{p} {b / 2**20:.1f} MB" for p, b in self.per_image.items())
        state = "on" if enabled else "off; feature_cache.enabled=true to use it"
        parts = parts if self.exact else f"up to {parts} (images of their own sizes: the most tiles)"
        if self.images is None:
            return f"feature cache on disk ({state}): {parts} per image (the training images could not be counted)"
        variants = f" x {self.variants} variants" if self.variants > 1 else ""
        line = (
            f"feature cache on disk ({state}): {parts} per image x {self.images} training images{variants} = "
            f"{self.total / GB:.2f} GB"
        )
        if enabled and self.in_flight >= 1 * GB:
            line += (
                f"; the loader's batches hold copies of up to {self.in_flight / GB:.1f} GB of entries in page-locked "
                f"host RAM per rank ({self.batches_in_flight} batches of {self.batch_size}: fewer data.num_workers "
                "lowers it)"
            )
        return line


def cache_size(cfg: TrainConfig, images: int | None) -> CacheSize:
    """Per-image sizes of the cached parts of `cfg` (`feature_cache.parts` the family supports)."""
    sizes = {"sam": sam_bytes_per_image, "vision": vision_bytes_per_image}
    per_image = {p: sizes[p](cfg) for p in cfg.feature_cache.parts if p in sizes}
    per_image = {p: b for p, b in per_image.items() if b > 0}
    a = cfg.data.augment
    variants = a.variants if a.enabled and a.variants >= 1 else 1
    # DataLoader's default prefetch: 2 batches per worker, plus the batch being pinned and trained on
    in_flight = 2 * cfg.data.num_workers + 1 if cfg.data.num_workers > 0 else 1
    # the vision part is a worst case when images keep their own sizes and may be cut into several tiles
    exact = "vision" not in per_image or cfg.data.image_size is not None or cfg.model.max_tiles == 1
    return CacheSize(per_image, images, variants, exact, in_flight, cfg.data.batch_size)


def training_images(cfg: TrainConfig) -> int | None:
    """Distinct training images of the configured data (records read and split, no image decoded)."""
    from vseg.data.dataset import split_records
    from vseg.data.sources import read_records

    try:
        train, _ = split_records(read_records(cfg.data), cfg.data.split, cfg.data.seed)
    except Exception:  # noqa: BLE001 - the plan stays useful without the count; train.py reports the data
        return None
    return len(train)
