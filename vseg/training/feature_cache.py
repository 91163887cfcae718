"""The frozen encoders' outputs, read from the disk cache in the training step instead of recomputed.

What is frozen under every `lora` preset, and so what is cached (`feature_cache.parts`):

* `sam`: SAM-2's Hiera trunk + FPN neck (`SamGrounding.encode_backbone`). Never trained; the mask decoder's
  1x1 projections of those maps (trained) still run in the step.
* `vision`: InternVL's vision tower at the feature layer, class token dropped, pixel-shuffled
  (`InternVLFamily.frozen_image_features`). LoRA targets the LLM only, so the tower is frozen in every
  preset; the projector (`mlp1`) trains in every preset (`lora.train_projector`), so it is not cached and
  runs in the step. The Qwen-VL families keep their vision tower in the step (their trained merger sits
  inside it), so only `sam` is cached for them.

An entry is keyed by a hash of the encoder's input tensor (`content_keys`, computed by the dataset), so it is
exact for exactly those pixels; the store's fingerprint covers the weights and config (`model_identity`).

Every strategy: DDP and ZeRO-1/2 (+offload) keep the frozen encoders whole on each rank, so each rank
encodes only its own misses. Under ZeRO-3 the encoders are partitioned and running one gathers its weights
from every rank: the ranks agree (one all-reduce per part and step) whether anyone must encode; if so, every
rank runs the encoder (a rank without misses on one of its inputs, result unused), otherwise none does and
the partitioned modules are not called at all.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vseg.artifacts.feature_store import FeatureStore, weights_identity
from vseg.config import ConfigError, TrainConfig
from vseg.model.families import get_family

log = logging.getLogger(__name__)

#: ModelConfig fields that do not change what a frozen encoder computes from given pixels
_NOT_FEATURES = ("name", "gradient_checkpointing", "sam_feature_cache", "prompt_style", "template", "init_device")


def encoder_dtype(precision: str) -> torch.dtype | None:
    """The half dtype a trainer precision (`bf16-mixed`, `16-true`, ...) runs in; None for 32-bit."""
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(str(precision).split("-")[0])


def model_identity(cfg: TrainConfig, part: str) -> dict[str, Any]:
    """Everything besides the input that decides `part`'s features: the weights (a folder's files, or for a
    random-init base the config and seed it was drawn from), dtype, attention kernel, the encoder config, and
    how the step runs it (trainer precision; DeepSpeed casts bf16/fp16 parameters and drops autocast)."""
    m = cfg.model
    identity: dict[str, Any] = {
        "family": m.family,
        "dtype": m.dtype,
        "attn_implementation": m.attn_implementation,
        "precision": str(cfg.trainer.get("precision", "32-true")),
        "deepspeed": cfg.strategy.stage > 0,
        **weights_identity(m.path),
    }
    if m.path is None:  # random weights: drawn from the seed, in an order the whole config and build path decide
        model = {k: v for k, v in dataclasses.asdict(m).items() if k not in _NOT_FEATURES}
        identity["random_init"] = {
            "model": model,
            "seed": cfg.seed,
            "init_device": m.init_device,
            "zero3": cfg.strategy.stage == 3,
        }
    if part == "sam":
        identity["sam2"] = dict(m.sam2)
    else:
        identity.update(vision=dict(m.vision), downsample_ratio=m.downsample_ratio)
    return identity


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """True when `flag` is True on any rank of the default process group (one all-reduce of one number)."""
    import torch.distributed as dist

    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def cache_parts(cfg: TrainConfig) -> list[str]:
    """`feature_cache.parts` this model can cache (vision only where the family computes it apart)."""
    family = get_family(cfg.model.family)
    return [p for p in cfg.feature_cache.parts if p == "sam" or family.vision_cacheable]


class FrozenFeatures:
    """The training step's view of the disk cache: features for a batch, from disk or encoded and written.

    Args:
        stores: one `FeatureStore` per cached part (`sam`, `vision`).
    """

    def __init__(self, stores: dict[str, FeatureStore]):
        self.stores = stores

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> FrozenFeatures:
        """The stores of `cfg` under `feature_cache.dir` (train.py sets it to the run's `feature_cache/`)."""
        fc = cfg.feature_cache
        if not fc.dir:
            raise ConfigError("feature_cache.dir is not set: give a node-local directory (train.py uses the run's)")
        parts = cache_parts(cfg)
        skipped = sorted(set(fc.parts) - set(parts))
        if skipped:
            log.info(
                "feature cache: %s not cached for model.family=%s (computed in the step)", skipped, cfg.model.family
            )
        return cls({p: FeatureStore(Path(fc.dir), p, model_identity(cfg, p), fc.verify) for p in parts})

    def inputs(
        self, batch: dict[str, Any], model: Any, agree: Callable[[bool], bool]
    ) -> tuple[list[torch.Tensor] | None, dict[str, Any]]:
        """(SAM-2 backbone maps or None, the MLLM's image inputs) for `model.forward(..., backbone=...)`.

        Args:
            batch: a collated training batch with `content_keys`.
            model: the `Sa2VA` being trained.
            agree: True when any rank says True (under ZeRO-3 a collective; elsewhere the identity).
        """
        keys = batch["content_keys"]
        # per sample {part: tensors (read as the loader pinned the batch), an unread `StoredEntry`, or None}
        prefetched = batch.get("cached_features") or [{} for _ in keys]
        backbone = None
        mllm_inputs = batch["mllm_inputs"]
        if "sam" in self.stores:
            grounding = model.grounding
            pixels = batch["sam_pixel_values"]

            def encode_sam(indices: list[int]) -> list[list[torch.Tensor]]:
                fresh = grounding.encode_backbone(pixels[indices])
                return [[f[j] for f in fresh] for j in range(len(indices))]

            known = [p.get("sam") for p in prefetched]
            found = self.lookup(self.stores["sam"], [k["sam"] for k in keys], encode_sam, agree, known)
            device = next(grounding.sam.vision_encoder.parameters()).device
            # entries may sit on the host (read here) or the device (from the loader, or just encoded)
            backbone = [
                torch.stack([levels[i].to(device, non_blocking=True) for levels in found]) for i in range(len(found[0]))
            ]
        if "vision" in self.stores:
            mllm = model.base_mllm
            pixels = mllm_inputs["pixel_values"]
            tiles = [int(k["tiles"]) for k in keys]
            starts = [sum(tiles[:i]) for i in range(len(tiles))]

            def encode_vision(indices: list[int]) -> list[list[torch.Tensor]]:
                chosen = torch.cat([pixels[starts[i] : starts[i] + tiles[i]] for i in indices])
                fresh = model.family.frozen_image_features(mllm, chosen)
                return [[part] for part in fresh.split([tiles[i] for i in indices])]

            known = [p.get("vision") for p in prefetched]
            found = self.lookup(self.stores["vision"], [k["vision"] for k in keys], encode_vision, agree, known)
            device = next(mllm.model.vision_tower.parameters()).device
            features = torch.cat([f[0].to(device, non_blocking=True) for f in found])
            mllm_inputs = {**mllm_inputs, "image_features": features}
        return backbone, mllm_inputs

    @staticmethod
    def lookup(
        store: FeatureStore,
        keys: list[str],
        encode: Callable[[list[int]], list[list[torch.Tensor]]],
        agree: Callable[[bool], bool],
        known: list[Any] | None = None,
    ) -> list[list[torch.Tensor]]:
        """Per key its tensors: given (`known`: tensors the loader read as it pinned the batch), read from
        `store`, or encoded (all misses of the batch in one call) and written.

        `encode(indices)` runs the frozen encoder on those batch rows. When no key misses but `agree` says
        another rank encodes, the encoder still runs once on row 0 (ZeRO-3: every rank joins its gathers).
        """
        found: dict[str, list[torch.Tensor]] = {}
        missing: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key in found or key in missing:
                continue
            # read when the loader pinned the batch; a `StoredEntry` the loader did not pin is read here
            tensors = known[i] if known is not None and isinstance(known[i], list) else store.read(key)
            if tensors is None:
                missing[key] = i
            else:
                found[key] = tensors
                store.stats.hits += 1
        if agree(bool(missing)) or missing:
            fresh = encode(list(missing.values()) or [0])
            for key, tensors in zip(missing, fresh, strict=False):
                found[key] = tensors
                store.write(key, tensors)
            store.stats.misses += len(missing)
        return [found[k] for k in keys]

    def summary(self) -> str:
        """One line per part: entries read, encoded, written, damaged."""
        lines = []
        for part, store in self.stores.items():
            s = store.stats
            lines.append(
                f"{part}: {s.hits} read, {s.misses} encoded ({s.written} written here, {s.busy} written by another "
                f"process), {s.corrupt} damaged entries re-encoded; {store.dir}"
            )
        return "; ".join(lines)
