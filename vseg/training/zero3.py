"""Building a run's model for its strategy, and what ZeRO-3 needs for it.

Under ZeRO-3 the model is built inside Lightning's `configure_model`, where `deepspeed.zero.Init`
partitions every parameter as its module is created (no full copy on any GPU), with transformers / PEFT
told about the DeepSpeed config (`HfDeepSpeedConfig`) so they gather what they must read. LoRA matrices
created under partitioning are then re-initialised on gathered copies (PEFT's own init writes into empty
shards: lora_B would keep nn.Linear's random init instead of zeros), and the parameters Sa2VA reads outside
their own module's forward (PEFT token rows, SAM-2 tokens) are registered with DeepSpeed.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable
from typing import Any

import torch

from vseg.artifacts import build_sa2va
from vseg.model.build import apply_training_setup, build_tokenizer
from vseg.model.sizes import build_on_meta


# ---------------------------------------------------------------------------------------------- ZeRO-3 build
def _is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _gathered(params: list[torch.nn.Parameter], modifier_rank: int | None):
    """deepspeed.zero.GatheredParameters when any of `params` is partitioned, else a no-op context."""
    if not any(_is_partitioned(p) for p in params):
        return contextlib.nullcontext()
    import deepspeed  # only where ZeRO-3 runs: an optional package, slow to import

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _rank() -> int:
    return (
        torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    )


def lora_pairs(model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
    """(module name, lora_A weight, lora_B weight) for every LoRA adapter of `model`."""
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(lora_b, torch.nn.ModuleDict):
            continue
        for adapter in lora_a:
            if adapter in lora_b and hasattr(lora_a[adapter], "weight"):
                yield f"{name}.{adapter}", lora_a[adapter].weight, lora_b[adapter].weight


def reinit_lora(model: torch.nn.Module) -> int:
    """PEFT's default LoRA init (A: kaiming-uniform a=sqrt(5), B: zeros) on gathered copies; returns the count.

    Collective under ZeRO-3 (every rank must call it); rank 0's values are kept. A no-op change on an
    unpartitioned model other than re-drawing A.
    """
    count = 0
    for _, a, b in lora_pairs(model):
        with _gathered([a, b], modifier_rank=0), torch.no_grad():
            if _rank() == 0 or not _is_partitioned(a):
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                torch.nn.init.zeros_(b)
        count += 1
    return count


def lora_init_report(model: torch.nn.Module) -> dict[str, float]:
    """Largest |lora_B| and smallest per-matrix max |lora_A| over all adapters (gathered; collective)."""
    max_b, min_a = 0.0, math.inf
    for _, a, b in lora_pairs(model):
        with _gathered([a, b], modifier_rank=None):
            max_b = max(max_b, float(b.detach().abs().max()))
            min_a = min(min_a, float(a.detach().abs().max()))
    return {"max_abs_lora_B": max_b, "min_max_abs_lora_A": min_a}


def zero3_register_reads(model: torch.nn.Module) -> dict[str, int]:
    """Tells ZeRO-3 about parameters that are read outside their own module's forward; returns counts.

    DeepSpeed gathers a module's own parameters for its forward and backward only; a tensor read any other
    way is an empty partition (seen: `index_copy_(): ... source.size(dim) (0)`, `expand([5, 64], size=[0])`).
    Such reads in Sa2VA:
    * PEFT's trainable-token layers build the merged matrix from the base weight and their row deltas
      (a ParameterDict child) without calling either; a tied layer (the LM head of a tied model) reads the
      deltas of the layer it is tied to. All of these are registered as the layer's external parameters.
      (Marking the layers ZeRO-3 leaf modules instead fails for untied models: the embedding's deltas are
      released before their gradient is accumulated.)
    * SAM-2's prompt encoder and mask decoder read their `nn.Embedding` children by `.weight`
      (no-mask, not-a-point, IoU, mask and object-score tokens): external parameters of those modules.
    * `Sa2VA.forward` adds SAM-2's `no_memory_embedding` itself: an external parameter of the Sa2VA module.
    Collective-free and idempotent; call it before DeepSpeed wraps the model (in `configure_model`).
    """
    from deepspeed.runtime.zero import register_external_parameter
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]
    counts = {"token_layers": len(layers), "external": 0}
    for layer in layers:
        reads = [layer.get_base_layer().weight, *layer.trainable_tokens_delta.parameters()]
        if layer.tied_adapter is not None:
            reads += list(layer.tied_adapter.trainable_tokens_delta.parameters())
        for p in reads:
            register_external_parameter(layer, p)
            counts["external"] += 1
    grounding = getattr(model, "grounding", None)
    if grounding is not None:
        sam = grounding.sam
        for owner in (sam.prompt_encoder, sam.mask_decoder):
            for child in owner.children():
                if isinstance(child, torch.nn.Embedding):
                    register_external_parameter(owner, child.weight)
                    counts["external"] += 1
        register_external_parameter(model, sam.no_memory_embedding)
        counts["external"] += 1
    return counts


def build_sa2va_zero3(model_cfg: Any, lora: Any, ds_config: dict[str, Any], base: torch.nn.Module | None = None):
    """Sa2VA for ZeRO-3, called inside Lightning's `configure_model` (i.e. inside `deepspeed.zero.Init`).

    Args:
        model_cfg / lora: the run's ModelConfig / LoraConfig.
        ds_config: the DeepSpeed config of the strategy (stage 3).
        base: an already loaded frozen Sa2VA (`model.path` runs load it on the CPU); it is partitioned onto
            the GPUs parameter by parameter. None: the random-init model is built partitioned.

    Returns:
        (model, tokenizer, hf_ds_config); keep the last alive as long as the model (transformers and PEFT
        check it to know that ZeRO-3 is on).
    """
    import deepspeed  # only where ZeRO-3 runs: an optional package, slow to import
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(ds_config)
    if base is None:
        model, tokenizer = build_sa2va(model_cfg, None)
    else:
        tokenizer, _ = build_tokenizer(model_cfg)
        deepspeed.zero.Init(module=base, config_dict_or_path=ds_config)
        model = base
    if lora is not None:
        apply_training_setup(model, lora, tokenizer)
        reinit_lora(model)
        zero3_register_reads(model)
    if model_cfg.gradient_checkpointing:
        model.base_mllm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer, hf_ds


def model_for_run(cfg: Any) -> tuple[torch.nn.Module, Any, Any]:
    """(model, tokenizer, builder) for `train.run`.

    ZeRO-3: `model` only stands in (shapes and config, for the processor and the parameter count: built
    on the meta device, or the CPU-loaded base of a `model.path` run) and `builder(strategy)` makes the real
    one in `configure_model`. Otherwise the model is built here (on `model.init_device`) and builder is None.
    """
    if cfg.strategy.stage == 3:
        if cfg.model.path is None:
            stand_in, tokenizer = build_on_meta(cfg.model, cfg.lora)
            base = None
        else:
            # Host memory: one frozen copy per rank while it is partitioned onto the GPUs.
            stand_in, tokenizer = build_sa2va(cfg.model, None)
            base = stand_in

        def builder(strategy: Any) -> torch.nn.Module:
            model, _, hf_ds = build_sa2va_zero3(cfg.model, cfg.lora, strategy.config, base=base)
            model._hf_deepspeed_config = hf_ds  # keeps transformers/PEFT aware of ZeRO-3 while the model lives
            return model

        return stand_in, tokenizer, builder
    if cfg.model.init_device == "cuda" and torch.cuda.is_available():
        with torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))):
            model, tokenizer = build_sa2va(cfg.model, cfg.lora)
        return model, tokenizer, None
    model, tokenizer = build_sa2va(cfg.model, cfg.lora)
    return model, tokenizer, None
