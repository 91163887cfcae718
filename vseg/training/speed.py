"""Less host work per training step: the switches of `speed:` in the training config.

At the micro-batches users train with on 24 GB cards (1-2) a step is bound by the host issuing kernels, not
by the GPU (BENCHMARKS.md, "What a micro-batch-8 step waits for"). Each switch removes a share of that work
and is measured on its own (`bench/train_vs_plain.py`):

- `bf16_weights` (`MasterWeights`): PEFT keeps LoRA weights in float32, so every adapted linear layer casts
  its input to float32 and autocast casts input and both weights back to bf16 on every use, again in the
  recomputation of gradient checkpointing. Holding the trainable weights in bf16 removes those copies; the
  optimizer steps float32 master copies (the usual mixed-precision recipe), so the update itself keeps full
  precision. Under autocast a float32 weight is used as its bf16 rounding, so a run without accumulation
  computes exactly the same losses either way (tested); with accumulation the micro-batch gradients add up
  in bf16 before reaching the masters.
- `liger`: Liger's Triton kernels (one kernel each for RMSNorm, SwiGLU and rotary embedding) in the LLM.
  Not its fused linear cross-entropy: vseg already projects only the answer tokens through the LM head
  (a few per sample), and the head carries PEFT's trainable token rows, whose merged weight would have to
  be built on every call to hand it to a fused kernel.
- `host_positions`: see `vseg.model.sa2va.find_positions`.
- `cuda_graphs`: the LLM's compiled layers replay CUDA graphs (inductor's reduce-overhead mode): one launch per
  layer call. Compiled layers alone still launch ~50 kernels per layer forward and ~110 per backward from
  Python, ~3-4 ms of host time per call against well under 1 ms of GPU work at micro-batch 2 (BENCHMARKS.md).
  Graphs need fixed shapes: the layers compile for static shapes and the collate pads text to a multiple of
  `pad_tokens`. Graph outputs live in a pool that the next replay overwrites, so every trainable weight's
  gradient is kept in a tensor of its own (`GradsOutsideGraphs`) that backward adds into, never one handed
  out by a graph. With checkpointing the recomputation runs inside the compiled backward (`vseg.model.compile`),
  which is what lets the graphs work there (CUDA graphs around a compiled region *inside* a checkpoint crash:
  pytorch/pytorch#154306).
- `overlap_steps`: the host does not wait for a step's end before it starts the next: the bad-step guard's
  decision stays on the GPU (`NonFiniteGuard.defer`), and `SideStreamCopy` copies the next batch (with the
  disk cache, 44 MB of SAM-2 features per image) while the GPU still runs the backward pass before it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn

from vseg.config import SpeedConfig, TrainConfig
from vseg.model.compile import Compiled, allow_cuda_graphs, compile_blocks, keep_graph_order

log = logging.getLogger(__name__)

LIGER_PATCHES = {"qwen2": "apply_liger_kernel_to_qwen2", "qwen3": "apply_liger_kernel_to_qwen3"}


def bf16_weights_apply(precision: str, deepspeed: bool, base_dtype: str = "bfloat16") -> bool:
    """Whether `speed.bf16_weights` can take effect: bf16 autocast next to a bf16 frozen base (`model.dtype`; a
    float32 base keeps float32 trainable weights, which its norms need on the CPU), and no DeepSpeed (which
    keeps its own masters)."""
    return str(precision) == "bf16-mixed" and not deepspeed and base_dtype == "bfloat16"


class MasterWeights:
    """Trainable parameters held in bf16 in the model, with float32 masters that the optimizer steps.

    Built before the model is wrapped (DDP buckets take the parameters' dtype when they are made). Each
    optimizer step: `grads_to_masters` (before clipping and the optimizer), the optimizer on the masters,
    then `masters_to_model`. Checkpoints store the masters (float32, the same keys as before).

    Args:
        named: (name, parameter) of every trainable parameter, names as in the module's state dict.
    """

    def __init__(self, named: Iterable[tuple[str, nn.Parameter]]):
        named = list(named)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.masters = [nn.Parameter(p.detach().float().clone()) for p in self.params]
        for p in self.params:
            p.data = p.data.to(torch.bfloat16)

    def master_of(self, param: nn.Parameter) -> nn.Parameter:
        """The float32 master of a model parameter."""
        for p, m in zip(self.params, self.masters, strict=True):
            if p is param:
                return m
        raise KeyError("not a trainable parameter of this model")

    @torch.no_grad()
    def grads_to_masters(self) -> None:
        """Moves the model's bf16 gradients into the masters' float32 gradients (a few grouped kernels)."""
        pairs = [(m, p) for m, p in zip(self.masters, self.params, strict=True) if p.grad is not None]
        if not pairs:
            return
        for m, _ in pairs:
            if m.grad is None:
                m.grad = torch.empty_like(m)
        torch._foreach_copy_([m.grad for m, _ in pairs], [p.grad for _, p in pairs])
        for _, p in pairs:
            p.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        """Rounds the stepped masters into the model's bf16 weights."""
        torch._foreach_copy_([p.data for p in self.params], [m.data for m in self.masters])

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Takes the masters from a checkpoint's float32 values (resume), before they are rounded into the model."""
        for name, m in zip(self.names, self.masters, strict=True):
            if name in state:
                m.data.copy_(state[name])

    def state(self) -> dict[str, torch.Tensor]:
        """Masters by state-dict name, for checkpoints."""
        return {n: m.detach() for n, m in zip(self.names, self.masters, strict=True)}

    @torch.no_grad()
    def restore_fp32(self) -> None:
        """Puts the float32 masters back into the model (end of training: final weights and exports in float32)."""
        for p, m in zip(self.params, self.masters, strict=True):
            p.data = m.detach().clone()


def apply_liger(language_model: nn.Module) -> bool:
    """Liger's RMSNorm, SwiGLU and RoPE kernels in `language_model` (a transformers Qwen2 / Qwen3 decoder).

    Returns False, with a warning naming what is missing, where they cannot run (no CUDA, `liger-kernel` not
    installed, another decoder type): the transformers path then stays as it is. The RoPE patch replaces
    the decoder module's rotary function for the whole process (that is how Liger applies it).
    """
    kind = getattr(getattr(language_model, "config", None), "model_type", None)
    if not torch.cuda.is_available():
        log.warning("speed.liger=true: Liger's kernels need a CUDA GPU; training with the transformers kernels")
        return False
    if kind not in LIGER_PATCHES:
        log.warning("speed.liger=true: no Liger patch for a %s decoder; training with the transformers kernels", kind)
        return False
    try:
        import liger_kernel.transformers as liger

        patch = getattr(liger, LIGER_PATCHES[kind])
    except Exception as err:  # noqa: BLE001 - not installed, or built for another transformers / triton
        log.warning(
            "speed.liger=true but liger-kernel cannot be used (%s: %s; pip install 'vseg[liger]'); "
            "training with the transformers kernels",
            type(err).__name__,
            err,
        )
        return False
    patch(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        model=language_model,
    )
    log.info("speed.liger: Liger RMSNorm, SwiGLU and RoPE kernels in the %s decoder", kind)
    return True


def cuda_graphs_apply(speed: SpeedConfig, deepspeed: bool, zero3: bool, device_type: str) -> bool:
    """Whether `speed.cuda_graphs` takes effect: compiled blocks on CUDA, not under DeepSpeed (whose gradient
    hooks and partitioned buffers have not been tried with graph-pool gradients)."""
    return speed.compile and speed.cuda_graphs and not deepspeed and not zero3 and device_type == "cuda"


class GradsOutsideGraphs:
    """Trainable weights' gradients in tensors of their own, never in the CUDA-graph pool.

    Autograd's first accumulation into an empty `.grad` keeps the incoming tensor itself; under CUDA graphs that
    tensor is a graph output, which the next replay (the next micro-batch) overwrites. With a zero gradient
    already in place, backward adds into it instead, and zeroing it (`set_to_none=False`) keeps it in place.
    """

    def __init__(self, params: Iterable[nn.Parameter]):
        self.params = [p for p in params if p.requires_grad]

    def ensure(self) -> None:
        """Before a forward: a zero gradient for every trainable weight that has none (the first step; a
        skipped bad step drops them)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)


def apply_speed(
    model: nn.Module,
    trainable: list[tuple[str, nn.Parameter]],
    cfg: TrainConfig,
    precision: str,
    deepspeed: bool,
    zero3: bool,
    device_type: str = "cuda",
) -> tuple[MasterWeights | None, str | None, bool]:
    """The `speed:` switches that change the model, before a strategy wraps it (DDP's buckets take the dtypes):
    Liger's kernels, compiled blocks and bf16 trainable weights. `trainable`: (checkpoint name, parameter) of
    every trainable parameter; `device_type`: where the strategy will run the model (it may still be on the CPU
    here). Returns (the masters, what was compiled, whether the LLM's layers replay CUDA graphs)."""
    speed = cfg.speed
    announce = rank_zero_only.rank == 0  # every rank decides and compiles the same; one says so
    graphs = cuda_graphs_apply(speed, deepspeed, zero3, device_type)
    if speed.cuda_graphs and speed.compile and not graphs and announce:
        log.warning(
            "speed.cuda_graphs=true is ignored here (%s): the LLM's layers compile without graphs",
            "DeepSpeed" if deepspeed or zero3 else f"device {device_type}, CUDA only",
        )
    if speed.liger:
        apply_liger(getattr(model.base_mllm.model, "language_model", model.base_mllm))
    compiled = None
    if speed.compile:
        if zero3:  # strategy=auto chose ZeRO-3 (an explicit zero3 is refused by validate)
            log.warning("speed.compile=true is ignored under ZeRO-3 (chosen by strategy=auto): blocks run eagerly")
        else:
            if device_type == "cpu":
                log.warning(
                    "speed.compile=true on the CPU: inductor builds C++ kernels for every block class first "
                    "(minutes), and its gain is measured on GPUs only; set speed.compile=false for CPU runs"
                )
            # the text length changes every batch: the LLM's layers compile dynamic from the start (with CUDA
            # graphs the collate pads the text to a few lengths, each compiled and recorded static); the image
            # blocks see fixed sizes, so they compile for them (a smaller last batch compiles them once more,
            # dynamic in the batch only) and never pay the cost of compiling every size symbolic
            llm = getattr(model.base_mllm.model, "language_model", None)
            graphs = graphs and llm is not None
            if graphs:
                allow_cuda_graphs()
            mode = "reduce-overhead" if graphs else None
            parts = [compile_blocks(llm, dynamic=not graphs, mode=mode, announce=announce)] if llm is not None else []
            parts.append(compile_blocks(model, announce=announce))
            compiled = Compiled({k: v for part in parts for k, v in part.blocks.items()}).describe()
            if graphs and announce:
                log.info(
                    "speed.cuda_graphs: the LLM's layers replay CUDA graphs, one recording per text length "
                    "(padded to a multiple of %d tokens)",
                    speed.pad_tokens,
                )
            if cfg.model.gradient_checkpointing:
                keep_graph_order()  # the recomputation must run the forward's graph
    masters = None
    if speed.bf16_weights:
        if bf16_weights_apply(precision, deepspeed, cfg.model.dtype):
            masters = MasterWeights(trainable)
        else:
            log.info(
                "speed.bf16_weights=true has no effect here (precision %s, model.dtype %s%s): it needs "
                "bf16-mixed, a bfloat16 base and no DeepSpeed",
                precision,
                cfg.model.dtype,
                ", DeepSpeed keeps its own fp32 masters" if deepspeed else "",
            )
    return masters, compiled, graphs


class SideStreamCopy:
    """Batches copied to the GPU on a CUDA stream of their own, so the copy runs next to the kernels queued
    before it instead of after them (on the compute stream the copy of a batch waits for the previous step's
    backward and optimizer, and the next forward waits for the copy).

    The compute stream waits for the copy before it uses the batch; each copied tensor is marked as used by
    the compute stream, so the allocator does not hand its memory out again before the step is done with it.
    The copies overlap only from pinned host memory (the loaders pin theirs on CUDA machines).
    """

    def __init__(self) -> None:
        self.stream: torch.cuda.Stream | None = None

    def __call__(self, batch: Any, device: torch.device, move: Callable[[Any, torch.device], Any]) -> Any:
        """`move(batch, device)` (the usual transfer) issued on the copy stream."""
        if device.type != "cuda":
            return move(batch, device)
        if self.stream is None or self.stream.device != device:
            self.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self.stream):
            moved = move(batch, device)
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(self.stream)
        # Lightning's own walk over a batch's nested dicts and lists (a dependency of lightning)
        apply_to_collection(moved, torch.Tensor, lambda t: t.record_stream(compute) if t.is_cuda else None)
        return moved
