"""FP8 inference for the frozen matmuls: torchao's float8 dynamic quantisation on a Sa2VA's linear layers.

Hopper / Ada GPUs (compute capability >= 8.9: H100, H200, L40S, RTX 4090) multiply float8 (e4m3) matrices
at twice their bf16 rate. `quantize_fp8` converts the `nn.Linear` weights of the chosen parts to float8 with
one scale per output row, and each call scales its activations per row on the fly (torchao's
`Float8DynamicActivationFloat8WeightConfig` with `PerRow` granularity); products accumulate in fp32 and come
out in bf16. Everything else (norms, attention, convolutions, the mask decoder and the [SEG] projection)
stays in bf16.

Parts (`FP8_PARTS`): the SAM-2 image encoder (Hiera trunk; its FPN neck is convolutions), the MLLM's vision
tower + projector, and its language model. The LM head is never converted (the fast path does not run it)
and neither is anything that is trained.

The conversion changes the numbers: per-row e4m3 keeps ~2 significant decimal digits, so mask logits move by a
little and pixels near the threshold can flip. `bench/predict.py --parts fast` measures the logit error and the
mask agreement against bf16; the option stays off by default (`fp8=false`).

torchao is an optional dependency (`pip install 'vseg[fp8]'`), imported only when FP8 is asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from vseg.config import ConfigError

log = logging.getLogger(__name__)

FP8_PARTS = ("sam_encoder", "vision", "llm")
#: torch._scaled_mm needs both matrix sides to be multiples of 16
_ALIGN = 16
#: the torchao release vseg is tested with (pyproject's `fp8` extra pins it)
TORCHAO_VERSION = "0.18.0"


@dataclass
class Fp8Report:
    """What `quantize_fp8` converted: linear layers per part, and those left in bf16 (and why)."""

    converted: dict[str, int] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)  # module name -> reason

    def describe(self) -> str:
        done = ", ".join(f"{part} {n}" for part, n in self.converted.items()) or "nothing"
        return f"fp8 linear layers: {done}; {len(self.kept)} kept in bf16"


def check_fp8_device(device: torch.device | str) -> None:
    """Raises a ConfigError unless `device` is a CUDA GPU with float8 tensor cores (compute capability >= 8.9)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(
            f"fp8=true needs an NVIDIA GPU with float8 tensor cores (H100 / H200 / L40S / RTX 4090, compute "
            f"capability >= 8.9); the model is on {device}. Drop fp8 (bf16 runs everywhere)."
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"fp8=true: {name} (compute capability {major}.{minor}) has no float8 tensor cores (needs >= 8.9: "
            "H100 / H200 / L40S / RTX 4090). Drop fp8."
        )


def _torchao():
    # lazy: torchao is optional (vseg[fp8]) and only fp8=true needs it
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as err:
        raise ConfigError(
            f"fp8=true needs torchao ({err}); install it with `pip install 'vseg[fp8]'` (torchao=={TORCHAO_VERSION})"
        ) from None
    return Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_


def fp8_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules of each FP8 part of a Sa2VA (`FP8_PARTS`), found through its family's parameter prefixes."""
    mllm = model.base_mllm
    family = model.family

    def at(prefix: str) -> nn.Module | None:
        try:
            return mllm.get_submodule(prefix.rstrip("."))
        except AttributeError:
            return None

    projectors = family.projector_prefix
    projectors = (projectors,) if isinstance(projectors, str) else tuple(projectors)
    vision = [m for m in (at(family.vision_prefix), *(at(p) for p in projectors)) if m is not None]
    llm = [m for m in (at(family.language_prefix),) if m is not None]
    return {"sam_encoder": [model.grounding.sam.vision_encoder], "vision": vision, "llm": llm}


def _eligible(name: str, module: nn.Module) -> str | None:
    """None if `module` can take float8 weights, else why not."""
    if not isinstance(module, nn.Linear) or type(module) is not nn.Linear:
        return "not a plain nn.Linear"  # (LoRA layers are merged before this runs; anything else stays)
    if module.weight.dtype != torch.bfloat16:
        return f"weights in {module.weight.dtype} (per-row fp8 starts from bf16)"
    if module.weight.requires_grad:
        return "trainable"
    out_f, in_f = module.weight.shape
    if in_f % _ALIGN or out_f % _ALIGN:
        return f"shape {out_f}x{in_f} is not a multiple of {_ALIGN}"
    return None


def quantize_fp8(model: nn.Module, parts: Iterable[str] = FP8_PARTS) -> Fp8Report:
    """Converts the linear layers of `parts` of a (bf16, eval, single-device) Sa2VA to float8 in place.

    Args:
        model: the Sa2VA, already in bfloat16 on its CUDA device, LoRA merged.
        parts: a subset of `FP8_PARTS`.

    Returns:
        How many layers were converted per part and which were kept in bf16.

    Raises:
        ConfigError: unknown part, no float8-capable GPU, or torchao missing.
    """
    parts = list(parts)
    unknown = sorted(set(parts) - set(FP8_PARTS))
    if unknown:
        raise ConfigError(f"fp8 parts {unknown}: expected some of {FP8_PARTS}")
    check_fp8_device(next(model.parameters()).device)
    config_cls, per_row, quantize_ = _torchao()
    # set_inductor_config=False: torchao would switch on inductor's coordinate-descent tuning for the whole
    # process, which multiplies compile time; vseg's compiled blocks keep inductor's defaults.
    config = config_cls(granularity=per_row(), set_inductor_config=False)
    report = Fp8Report()
    found = fp8_parts(model)
    for part in parts:
        chosen: set[int] = set()
        for root in found[part]:
            for name, module in root.named_modules():
                if not isinstance(module, nn.Linear):
                    continue
                why = _eligible(name, module)
                if why is None:
                    chosen.add(id(module))
                else:
                    report.kept[f"{part}:{name}"] = why
            quantize_(root, config, filter_fn=lambda m, _name, chosen=chosen: id(m) in chosen)
        report.converted[part] = len(chosen)
    log.info(report.describe())
    return report
