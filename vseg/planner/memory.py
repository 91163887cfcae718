"""Per-GPU memory estimate of one training (or prediction) setting, from a meta-device build of the model.

`vseg.planner.facts` reads the exact parameter counts, layer shapes and sequence length off a meta-device
build and the real processor (`model_facts`, `sequence_facts`). On top of those facts, the estimate is
arithmetic:

- Weights, gradients, optimizer states per strategy (bytes per parameter, ZeRO sharding over the GPU count;
  DESIGN.md "Memory facts"). Lightning bf16-mixed keeps trainable parameters in fp32 (AdamW: fp32 grad,
  m, v); DeepSpeed casts every parameter to bf16 and keeps fp32 master + m + v in the optimizer (ZeRO-2
  shards those and the fp32 gradient partition; ZeRO-3 also the weights; offload moves them to host RAM).
- LLM activations from what autograd saves per token per decoder layer (fp32 RMSNorm inputs, q/k/v and
  the attention output for SDPA, the SwiGLU inputs, every LoRA adapter's dropout output, mask and rank-r
  intermediate; frozen linears save nothing). Gradient checkpointing keeps one hidden state per layer plus
  one layer's working set during recompute.
- The frozen vision tower and SAM-2 image encoder run without autograd: only their transient working set
  counts (SAM-2's first Hiera stage at 1024 px dominates), the trainable projector and mask decoder save
  their inputs.
- Buffers: CUDA context (+ NCCL), DDP gradient buckets, DeepSpeed reduce buckets (double with overlap_comm),
  ZeRO-3 gathered layers and prefetch, allocator fragmentation, and PEFT's trainable token rows: their
  layers build the merged vocab x hidden matrix in every forward; the LM head's copy is saved for its
  backward, which also makes a gradient of the same size (two matrices at the start of backward).

Every constant is named below with the reason for it; `calibration.json` holds measured peaks and
tests/test_plan.py checks the estimate against each within +-15 %.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from vseg.config import StrategyConfig
from vseg.planner.facts import ZERO3_PERSISTENCE_DEFAULT, ModelFacts, SequenceFacts
from vseg.strategy import build_strategy, deepspeed_config

GB = 1024**3  # the planner's "GB" is GiB, as nvidia-smi's MiB / 1024
STRATEGY_DIR = Path(__file__).resolve().parents[2] / "conf" / "strategy"
PLANNED = ("single", "ddp", "zero2", "zero2_offload", "zero3", "zero3_offload")

CUDA_CONTEXT = 0.5 * GB  # CUDA context + cuBLAS/cuDNN workspaces: outside the torch allocator, inside nvidia-smi
NCCL_OVERHEAD = 0.3 * GB  # NCCL communicator buffers, several processes only
FRAGMENTATION = 0.10  # caching-allocator slack on what changes size every step (activations, grads, buckets)
# DeepSpeed keeps about 4.5 buckets of bf16 with overlap_comm (double-buffered reduce + gather / staging
# copies; the figure vseg/strategy.py documents for its bucket_size), about half of that without.
BUCKET_COPIES_OVERLAP = 4.5
BUCKET_COPIES = 2.25
HIERA_BLOCK_FACTOR = 12  # live tensors of one Hiera block (x, norm, qkv, attn, mlp 4x, residual) / its input
VISION_BLOCK_FACTOR = 6  # same for a ViT block in units of hidden (plus 2x the MLP width)


@dataclass
class Setting:
    """One way to run: strategy, GPU count, micro-batch, accumulation, checkpointing, precision."""

    strategy: str
    devices: int
    micro_batch: int
    accumulate: int = 1
    grad_ckpt: bool = True
    precision: str = "bf16-mixed"

    @property
    def effective_batch(self) -> int:
        return self.devices * self.micro_batch * self.accumulate


@dataclass
class Estimate:
    """Per-GPU bytes of one setting, by component, and host RAM."""

    setting: Setting
    frozen: float
    trainable: float
    grads: float
    optimizer: float
    activations: float
    buffers: float  # DeepSpeed / DDP buckets, ZeRO-3 gathered layers, fragmentation
    context: float  # CUDA context (+ NCCL): not in torch's allocator
    host: float  # host RAM of the whole machine while training (offloaded states, all ranks)
    host_setup: float  # host RAM at start-up: every rank builds the model on CPU before moving it
    detail: dict[str, float] = field(default_factory=dict)

    @property
    def allocated(self) -> float:
        """What torch.cuda.max_memory_allocated would report."""
        return self.frozen + self.trainable + self.grads + self.optimizer + self.activations + self.buffers_alloc

    @property
    def buffers_alloc(self) -> float:
        return self.buffers - self.detail.get("fragmentation", 0.0)

    @property
    def reserved(self) -> float:
        """What torch.cuda.max_memory_reserved would report."""
        return self.allocated + self.detail.get("fragmentation", 0.0)

    @property
    def total(self) -> float:
        """What nvidia-smi would show for the process: reserved + CUDA context."""
        return self.reserved + self.context

    def split(self) -> dict[str, float]:
        """Components in GB (buffers include the context), for tables."""
        return {
            "frozen": self.frozen / GB,
            "trainable": self.trainable / GB,
            "grads": self.grads / GB,
            "optimizer": self.optimizer / GB,
            "activations": self.activations / GB,
            "buffers": (self.buffers + self.context) / GB,
        }


# ---------------------------------------------------------------------------------------------- strategies
def strategy_config(name: str) -> StrategyConfig:
    """The StrategyConfig of `conf/strategy/<name>.yaml`."""
    path = STRATEGY_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"strategy {name!r}: no {path}")
    merged = OmegaConf.merge(OmegaConf.structured(StrategyConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- activations
def _activation_bytes(precision: str) -> int:
    return 2 if "16" in str(precision) else 4


def llm_layer_bytes_per_token(f: ModelFacts, a: int) -> float:
    """Bytes autograd saves per token in one decoder layer (frozen linears save nothing)."""
    h, i, kv = f.hidden, f.intermediate, f.kv_dim
    saved = 2 * 4 * h  # two RMSNorms keep their fp32 input
    saved += a * (h + 2 * kv + h)  # SDPA keeps q, k, v and its output
    saved += a * 3 * i  # SwiGLU: gate, silu(gate), up
    shared = {"attn": h, "o": h, "mlp": h, "down": i}
    group = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o", "gate_proj": "mlp", "up_proj": "mlp"}
    group["down_proj"] = "down"
    used: set[str] = set()
    for site in f.lora_sites:
        saved += a * site.r  # lora_A output, kept by lora_B
        if site.dropout:
            saved += (a + 1) * site.in_features  # dropout output + its mask: lora_A's own input
        else:
            key = group.get(site.leaf, site.leaf)
            if key not in used:  # lora_A keeps the (shared) input of the frozen linear
                used.add(key)
                saved += a * shared.get(key, site.in_features)
    return saved


def activations(f: ModelFacts, seq: SequenceFacts, s: Setting, inference: bool = False) -> dict[str, float]:
    """Peak activation bytes per GPU of one micro-batch, by part."""
    a = _activation_bytes(s.precision)
    b = s.micro_batch
    tokens = b * seq.length
    out: dict[str, float] = {}
    layer = llm_layer_bytes_per_token(f, a)
    if inference or not f.grad_through_llm:
        # No graph through the LLM: one layer's working set at a time.
        llm = tokens * (a * (4 * f.hidden + 2 * f.kv_dim + 3 * f.intermediate) + a * f.hidden)
    elif s.grad_ckpt:
        # One hidden state per layer; recompute + gradient of one layer at a time.
        llm = tokens * (f.llm_layers * a * f.hidden + 2 * layer)
    else:
        llm = tokens * (f.llm_layers * layer + layer)  # every layer's saved tensors + one layer's gradients
    if f.attn_implementation == "eager":  # attention probabilities are materialised (and kept)
        kept = 1 if inference or s.grad_ckpt else f.llm_layers
        llm += kept * b * f.heads * seq.length**2 * a * 2
    llm += tokens * (a + 4) * f.hidden  # final norm + hidden states handed to the heads
    out["llm"] = llm
    # Frozen vision tower: no autograd, one block's working set over all tiles of the micro-batch.
    out["vision_transient"] = (
        b * seq.vision_tokens * a * (VISION_BLOCK_FACTOR * f.vision_hidden + 2 * f.vision_intermediate)
    )
    # Trainable projector: LayerNorm (fp32), two linears and GELU keep their inputs.
    out["projector"] = 0.0 if inference else b * seq.image_tokens * ((4 + a) * f.projector_in + 2 * a * f.hidden)
    # SAM-2 image encoder (frozen, no autograd): Hiera stage 0 at S/4 resolution is the largest working set.
    stage0 = (f.sam_image // 4) ** 2 * f.sam_dim0
    out["sam_transient"] = b * HIERA_BLOCK_FACTOR * stage0 * a
    # Mask decoder (trainable): high-res projections keep their inputs; two-way transformer at S/16, upscaling.
    s4, s8, s16 = (f.sam_image // 4) ** 2, (f.sam_image // 8) ** 2, (f.sam_image // 16) ** 2
    decoder = f.sam_fpn * (s4 + s8) + f.sam_fpn * s16 * 12 + s4 * (f.sam_fpn // 8) * 6 + s8 * (f.sam_fpn // 4) * 6
    out["sam_decoder"] = b * a * (decoder if not inference else f.sam_fpn * s16 * 4)
    # Peak: the vision tower runs first (nothing else alive yet); SAM-2 encodes after the LLM's forward,
    # while its saved activations are alive.
    out["peak"] = (
        max(out["vision_transient"], out["llm"] + out["sam_transient"]) + out["projector"] + out["sam_decoder"]
    )
    return out


# ---------------------------------------------------------------------------------------------- estimate
def _grads_are_bucket_views(sc: StrategyConfig) -> bool:
    """Whether vseg's DDP strategy lets gradients live in its communication buckets (one copy, not two)."""
    strategy = build_strategy(sc)
    return bool(getattr(strategy, "_ddp_kwargs", {}).get("gradient_as_bucket_view", False))


def _devices_for(s: Setting) -> int:
    return 1 if s.strategy == "single" else max(s.devices, 1)


def estimate(f: ModelFacts, seq: SequenceFacts, s: Setting, strategy: StrategyConfig | None = None) -> Estimate:
    """Per-GPU memory of training `f` under setting `s` (strategy read from conf/strategy unless given)."""
    sc = strategy or strategy_config(s.strategy)
    n = _devices_for(s)
    pt, pf = f.trainable_params, f.frozen_params
    deepspeed = sc.stage in (1, 2, 3)
    mixed = "16" in str(s.precision)
    detail: dict[str, float] = {}
    buffers = 0.0
    token_bytes = f.weight_bytes
    if not deepspeed:
        frozen = float(f.frozen_bytes)
        trainable = float(f.trainable_bytes)  # fp32 under Lightning mixed precision
        grads = 4.0 * pt
        optimizer = 8.0 * pt  # AdamW m, v (fp32); the fp32 weights are their own master copy
        if s.strategy == "ddp" and n > 1 and not _grads_are_bucket_views(sc):
            detail["ddp_buckets"] = 4.0 * pt  # gradient buckets are a second copy of the gradients
        host = 0.0
    else:
        zero = deepspeed_config(sc)["zero_optimization"]
        wb = 2 if mixed else 4  # DeepSpeed casts every parameter to bf16 under bf16-mixed
        token_bytes = wb
        rbs = float(zero.get("reduce_bucket_size", 5e8))
        state = 12.0 * pt  # fp32 master + m + v
        grad32 = 4.0 * pt  # fp32 gradient partition
        offload_opt, offload_par = sc.offload_optimizer, sc.offload_parameters
        if sc.stage == 3:
            frozen = 0.0 if offload_par else wb * pf / n
            trainable = 0.0 if offload_par else wb * pt / n
            persistent = float(zero.get("stage3_param_persistence_threshold", ZERO3_PERSISTENCE_DEFAULT))
            detail["zero3_persistent"] = wb * f.small_params * (1 - 1 / n) if persistent else 0.0
            detail["zero3_gathered"] = wb * (f.largest_layer[1] + f.largest_block[1])
            detail["zero3_prefetch"] = wb * float(zero.get("stage3_prefetch_bucket_size", 5e7))
            detail["reduce_bucket"] = wb * rbs * (BUCKET_COPIES_OVERLAP if zero.get("overlap_comm") else BUCKET_COPIES)
        else:
            frozen = float(wb * pf)
            trainable = float(wb * pt)
            detail["reduce_bucket"] = wb * rbs * (BUCKET_COPIES_OVERLAP if zero.get("overlap_comm") else BUCKET_COPIES)
        grads = 0.0 if offload_opt else grad32 / n
        optimizer = 0.0 if offload_opt else state / n
        host = (state + grad32) if offload_opt else 0.0  # all ranks together
        if offload_par:
            host += wb * (pf + pt)
    # The LM head's merged token-row matrix (saved for backward) and its full-size gradient; bf16 under
    # DeepSpeed, the build dtype otherwise.
    detail["token_rows"] = 2.0 * token_bytes * f.token_matrix
    act = activations(f, seq, s)
    detail.update({f"act_{k}": v for k, v in act.items()})
    buffers = sum(v for k, v in detail.items() if not k.startswith("act_"))
    detail["fragmentation"] = FRAGMENTATION * (act["peak"] + grads + buffers)
    buffers += detail["fragmentation"]
    context = CUDA_CONTEXT + (NCCL_OVERHEAD if n > 1 else 0.0)
    ranks = n if s.strategy != "single" else 1
    host_setup = ranks * (f.frozen_bytes + f.trainable_bytes)
    return Estimate(s, frozen, trainable, grads, optimizer, act["peak"], buffers, context, host, host_setup, detail)


def estimate_inference(f: ModelFacts, seq: SequenceFacts, batch: int, precision: str = "bf16-mixed") -> Estimate:
    """One GPU predicting batches of `batch` images: all weights as built plus one forward's working set."""
    s = Setting("single", 1, batch, 1, False, precision)
    act = activations(f, seq, s, inference=True)
    peak = max(act["vision_transient"], act["llm"] + act["sam_transient"]) + act["sam_decoder"]
    weights = float(f.frozen_bytes + f.trainable_bytes)
    frag = FRAGMENTATION * peak
    detail = {f"act_{k}": v for k, v in act.items()} | {"fragmentation": frag}
    return Estimate(
        s, float(f.frozen_bytes), float(f.trainable_bytes), 0.0, 0.0, peak, frag, CUDA_CONTEXT, 0.0, weights, detail
    )
