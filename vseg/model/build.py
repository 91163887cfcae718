"""The typed builder: `ModelConfig` + `LoraConfig` -> a ready-to-train `Sa2VA` and its tokenizer.

Order matters and is fixed here: tokenizer first (special tokens found or added on CPU), then the MLLM
sized to that vocabulary (so no resize ever happens on a GPU or under ZeRO-3), SAM-2, the Sa2VA wrapper,
and finally what trains: PEFT LoRA on the LLM's linear layers, PEFT trainable token rows for the added
tokens, and the Sa2VA heads. Everything else is frozen.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import TrainableTokensConfig, get_peft_model
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from torch import nn
from transformers import PreTrainedTokenizerBase, Sam2Config, Sam2Model

from vseg.config import LoraConfig, ModelConfig
from vseg.model.families import get_family
from vseg.model.grounding import SamGrounding, unused_decoder_parameters
from vseg.model.sa2va import Sa2VA
from vseg.model.tokenizer import SA2VA_ADDED_TOKENS, SEG_TOKEN, ensure_special_tokens, load_tokenizer, token_id
from vseg.model.tracking import SamMemory, memory_config

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ParamCount:
    """Trainable / frozen parameter totals of a built model."""

    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return f"trainable {self.trainable:,} / total {self.total:,} ({share:.2f}%)"


def count_parameters(model: nn.Module) -> ParamCount:
    """Counts each parameter tensor once (tied weights are shared objects)."""
    seen: set[int] = set()
    trainable = frozen = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return ParamCount(trainable, frozen)


def build_tokenizer(cfg: ModelConfig) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """The model's tokenizer with every Sa2VA token present; also returns the tokens it had to add."""
    tokenizer = load_tokenizer(cfg.tokenizer_path or cfg.path)
    added = ensure_special_tokens(tokenizer, get_family(cfg.family).added_tokens)
    return tokenizer, added


def sam2_config(sam2: Mapping[str, Any]) -> Sam2Config:
    """transformers' SAM-2 config of `model.sam2` (its `memory` is for `build_grounding`).

    Made from a deep copy: transformers' config classes may write into the dicts they are given (5.17's
    Sam2Config sets `vision_config["model_type"]`), and these dicts are the run's own config, which a resumed
    run and every DDP rank compare with the one saved in the run directory.
    """
    return Sam2Config(**copy.deepcopy({k: v for k, v in sam2.items() if k != "memory"}))


def build_sam2(cfg: ModelConfig) -> Sam2Model:
    """The transformers SAM-2 of `cfg.sam2` (random weights); `cfg.sam2.memory` is for `build_grounding`."""
    sam_config = sam2_config(cfg.sam2)
    sam_config._attn_implementation = cfg.attn_implementation
    sam = Sam2Model(sam_config)
    # One random-Fourier matrix, as in SAM-2 (and in converted checkpoints); random init draws two.
    with torch.no_grad():
        sam.prompt_encoder.shared_embedding.positional_embedding.copy_(sam.shared_image_embedding.positional_embedding)
    return sam


def build_grounding(cfg: ModelConfig) -> SamGrounding:
    """SAM-2 plus its video memory (`vseg.model.tracking`; absent for SAM-2s too narrow for it)."""
    sam = build_sam2(cfg)
    config = memory_config(sam.config, cfg.sam2.get("memory"))
    memory = None
    if config is not None:
        # Drawn from a forked RNG: adding the memory changes no other random-init weight of a seeded build.
        with torch.random.fork_rng(devices=[]):
            memory = SamMemory(config)
    return SamGrounding(sam, memory)


def read_in(cfg: ModelConfig, dtype: str | None) -> ModelConfig:
    """`cfg` set to read its weights in `dtype` (the dtype inference runs in), where that is faithful.

    Weights from files (`cfg.path`) are read straight in `dtype`: reading them in the preset's bfloat16 and
    casting to float32 afterwards would round them first. A random-init base (no `cfg.path`) keeps the dtype
    it was trained in: its values were rounded to that dtype when the run built it, so that is what trained.
    """
    if dtype is None or cfg.path is None:
        return cfg
    return dataclasses.replace(cfg, dtype=dtype)


def new_sa2va(cfg: ModelConfig) -> tuple[Sa2VA, PreTrainedTokenizerBase]:
    """Sa2VA at the sizes in `cfg` with random weights (frozen, in `cfg.dtype`), and its tokenizer.

    Weights from a checkpoint folder (`cfg.path`) are loaded by `vseg.artifacts.build_sa2va`, which reads
    files; this module only builds networks.
    """
    tokenizer, _ = build_tokenizer(cfg)
    family = get_family(cfg.family)
    mllm = family.build(cfg, tokenizer)
    model = Sa2VA(mllm, family, build_grounding(cfg), token_id(tokenizer, SEG_TOKEN))
    model.requires_grad_(False)
    if not any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3 shards already have their dtype
        model.to(DTYPES[cfg.dtype])
    return model, tokenizer


def finish_build(model: Sa2VA, tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig, lora: LoraConfig | None) -> None:
    """The training setup of `lora` (None: fully frozen, for inference) and gradient checkpointing per `cfg`."""
    if lora is not None:
        apply_training_setup(model, lora, tokenizer)
    if cfg.gradient_checkpointing:
        model.base_mllm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log.debug("Sa2VA[%s]: %s", cfg.name, count_parameters(model))  # train.py logs the count once, at start-up


def _peft_model(mllm: nn.Module, config: PeftLoraConfig | TrainableTokensConfig, upcast: bool) -> nn.Module:
    """`get_peft_model`, without the FutureWarning its own code causes, its token-row layers `TokenRowsOnDevice`.

    PEFT 0.21's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5 deprecates
    (FutureWarning on every build). The read is inside PEFT, so only that one warning is silenced, here only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = get_peft_model(mllm, config, autocast_adapter_dtype=upcast)
    for module in model.modules():
        if type(module) is TrainableTokensLayer:
            module.__class__ = TokenRowsOnDevice
    return model


class TokenRowsOnDevice(TrainableTokensLayer):
    """PEFT's trainable token rows ([SEG] and the other added tokens) with their row index kept on the device.

    PEFT 0.21 merges the rows into the weight on every call from a Python list, `torch.tensor(ids).to(device)`:
    a copy from pageable host memory that waits for every kernel queued before it. Twice per step (embedding
    and LM head), that made the host wait 10 and 32 ms of a micro-batch-32 step on an H200 and left the GPU
    idle while it caught up. The merge is PEFT's own (`index_copy` of the deltas into the base weight); only the
    index is made once per adapter, ids and device.
    """

    def get_merged_weights(self, active_adapters) -> torch.Tensor:
        weight = self.base_layer.weight
        cache = self.__dict__.setdefault("_index_on_device", {})
        for name in active_adapters:
            ids = self.token_indices[name]
            key = (name, weight.device, tuple(ids))
            if key not in cache:
                cache[key] = torch.tensor(ids, device=weight.device)
            weight = weight.index_copy(dim=0, index=cache[key], source=self.trainable_tokens_delta[name].to(weight))
        return weight


def apply_training_setup(model: Sa2VA, lora: LoraConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Marks what trains (in float32) and injects the adapters; leaves everything else frozen."""
    family = model.family
    new_ids = [token_id(tokenizer, t) for t in SA2VA_ADDED_TOKENS] if lora.train_new_token_rows else []
    # ZeRO-3 (parameters partitioned while building): PEFT must not upcast the adapters to fp32 itself, that
    # would change only the empty placeholders, not the bf16 shards DeepSpeed optimises.
    upcast = not any(hasattr(p, "ds_id") for p in model.parameters())
    tied = bool(model.base_mllm.config.tie_word_embeddings)
    token_modules = ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
    if lora.enabled:
        targets = "|".join(sorted(set(lora.target_modules)))
        language = family.language_prefix.replace(".", r"\.")
        peft_config: PeftLoraConfig | TrainableTokensConfig = PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            # Only the LLM: the vision tower has q_proj/k_proj/... too and stays frozen.
            target_modules=rf"^{language}.*\.({targets})$",
            trainable_token_indices=dict.fromkeys(token_modules, new_ids) if new_ids else None,
            bias="none",
        )
        model.mllm = _peft_model(model.mllm, peft_config, upcast)
    elif new_ids:
        # No LoRA (lora=heads_only): a LoraConfig without target modules is refused by PEFT
        # (NoMatchingPeftModuleError), so the token rows get PEFT's own trainable-tokens adapter; it ties the
        # LM head to the embedding when the model ties them, exactly as LoRA's `trainable_token_indices` does.
        peft_config = TrainableTokensConfig(target_modules=token_modules, token_indices=new_ids)
        model.mllm = _peft_model(model.mllm, peft_config, upcast)
    base = model.base_mllm
    if lora.train_projector:
        for name, p in base.named_parameters():
            if name.startswith(family.projector_prefix):
                p.requires_grad_(True)
    if lora.train_mask_decoder:
        sam = model.grounding.sam
        sam.mask_decoder.requires_grad_(True)
        unused = set(unused_decoder_parameters(sam))
        for name, p in sam.named_parameters():
            if name in unused:
                p.requires_grad_(False)
    model.text_hidden_fcs.requires_grad_(lora.train_text_hidden_fcs)
    for p in model.parameters():
        if p.requires_grad and not hasattr(p, "ds_id"):  # ZeRO-3: DeepSpeed keeps the fp32 masters itself
            p.data = p.data.float()
