"""Regional `torch.compile`: every repeated block of the model is compiled on its own (inference and training).

A Sa2VA forward is three stacks of identical blocks (the SAM-2 Hiera trunk, the vision tower, the LLM) plus
small glue. Compiling the blocks rather than the whole model keeps compilation short: blocks of one class
with the same shapes share one compiled graph, so a 36-layer LLM compiles about one layer's worth.
Inductor fuses the element-wise work around the matmuls (norms, activations, residuals, window
partitioning) and drops work whose result is unused (transformers' SAM-2 Hiera attention computes a
softmax it never reads).

Each block is compiled in place (`nn.Module.compile`), so parameter names and state dicts do not change.
Shapes that change (the last, smaller batch; another prompt length) compile once more, then run
dynamic-shaped; the recompile limit is raised to leave room for every distinct block of the SAM-2 trunk.

In training (`speed.compile`) the compiled blocks also cut the host's work per step, which is what bounds a
small micro-batch: inductor issues one fused kernel where eager PyTorch issues several (LoRA's dropout, scale
and add; norms; activations), forward and backward.

Gradient checkpointing of a compiled block is compiled with it (`checkpoint` inside the compiled function):
the recomputation then runs inside the compiled backward graph. Left to transformers, where it depends on the
version: 5.17 checkpoints the block's `__call__`, outside the compiled region, so the recomputation calls the
compiled forward a second time from autograd's thread, with its guard check and Python's saved-tensor hooks
(an H200 profile: 36 such calls of 3.7 ms host time per micro-batch-2 step of the 4B LLM); later versions
checkpoint inside `forward` and so inside the region. vseg takes the checkpoint over from transformers for
the blocks it compiles, so both run the same way.

torch 2.11's inductor (the GPU image's) could not partition such a graph with dynamic shapes: its pattern
matcher copies the checkpoint's "recompute" tag up to the graph's inputs (the symbolic sizes among them), and
the partitioner then neither saves those inputs nor can recompute them ("Node ... was invalid, but is output").
Later torch stops at the inputs; `_untag_inputs` removes the tag from inputs on every version.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: torch.compile backend (the CPU tests trace with "aot_eager": the same graphs without inductor's C++ builds)
BACKEND = "inductor"
#: CUDA graphs recorded per compiled block function: one per layer, shape and direction (forward, backward)
RERECORD_LIMIT = 1024
#: compiled variants dynamo keeps per function. transformers 5 runs every block it can checkpoint through one
#: shared wrapper (`forward_with_checkpointing`), so the variants of all block classes count against one limit:
#: Hiera-L alone has ~10 (4 stages, pooling and global blocks), and grad mode and sizes add more (the tiny test
#: model already holds 8 on that wrapper after two training steps)
RECOMPILE_LIMIT = 64


@dataclass
class Compiled:
    """What `compile_blocks` compiled: block classes and how many blocks of each."""

    blocks: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        return ", ".join(f"{n} x {name}" for name, n in self.blocks.items()) or "nothing"


def repeated_blocks(model: nn.Module, min_repeats: int = 2) -> list[nn.Module]:
    """The members of every `nn.ModuleList` that holds at least `min_repeats` modules of one model class.

    Lists of plain `torch.nn` layers (a neck's convolutions) are not blocks: alone they have nothing to fuse.

    Lists nested inside a block that is already selected are not searched again (one compiled region
    per block, never a region inside a region).
    """
    selected: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList):
            continue
        members = list(module)
        if len(members) < min_repeats or len({type(m) for m in members}) != 1:
            continue
        if type(members[0]).__module__.startswith("torch.nn"):
            continue
        for block in members:
            selected.append(block)
            inside.update(id(m) for m in block.modules())
    return selected


def compile_blocks(
    model: nn.Module, mode: str | None = None, dynamic: bool | None = None, announce: bool = True
) -> Compiled:
    """Compiles every repeated block of `model` in place (see the module docstring); blocks already compiled
    (by an earlier call on a part of the model, with another `dynamic`) are left as they are.

    Args:
        model: the model, already on its device(s).
        mode: `torch.compile` mode (None: inductor's default).
        dynamic: `torch.compile`'s `dynamic`: None compiles for the first shapes and once more, with the sizes
            that changed dynamic, when they change; True compiles every size dynamic from the start (the LLM in
            training, whose text length changes every batch). True costs more to compile where blocks reshape
            by their sizes: SAM-2's windowed Hiera blocks spend minutes in sympy's simplification.
        announce: log what was compiled (one line; False on all but one rank of a distributed run).
    """
    # sympy's range analysis of dynamic shapes logs a warning per unsupported power it meets; it only gives up
    # a bound, compiled code is unaffected, and hundreds of such lines would bury the run's own log
    logging.getLogger("torch.utils._sympy.interp").setLevel(logging.ERROR)
    limit_key = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_key, max(getattr(torch._dynamo.config, limit_key), RECOMPILE_LIMIT))
    done = Compiled()
    checkpointed = None
    for block in repeated_blocks(model):
        if block._compiled_call_impl is not None:
            continue
        if getattr(block, "gradient_checkpointing", False):  # a transformers layer with checkpointing turned on
            if checkpointed is None:  # one compiled function for every block, as `nn.Module.compile` does
                _untag_inputs_before_partitioning()
                checkpointed = torch.compile(_checkpointed_call, backend=BACKEND, mode=mode, dynamic=dynamic)
            block.gradient_checkpointing = False  # transformers' own checkpoint would wrap the region from outside
            block._vseg_checkpointed = True
            block._compiled_call_impl = functools.partial(checkpointed, block)
        else:
            block.compile(backend=BACKEND, mode=mode, dynamic=dynamic)
        name = type(block).__name__
        done.blocks[name] = done.blocks.get(name, 0) + 1
    if announce:
        log.info("torch.compile (%s): %s", BACKEND, done.describe())
    return done


def _checkpointed_call(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The block's call under non-reentrant checkpointing while it trains with gradients (as transformers runs
    it), otherwise as is. Compiled: dynamo traces the checkpoint into the graph, and the partitioner keeps the
    block's inputs for the backward and recomputes the rest there."""
    if block.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block._call_impl, *args, use_reentrant=False, **kwargs)
    return block._call_impl(*args, **kwargs)


def _untag_inputs(graph: torch.fx.Graph) -> None:
    """A graph input carries no checkpoint "recompute" tag: an input cannot be recomputed, so the tag means
    nothing there on any version, and torch 2.11's partitioner leaves such an input unsaved (module docstring)."""
    for node in graph.find_nodes(op="placeholder"):
        node.meta.pop("recompute", None)
        node.meta.pop("ac_graph_id", None)


def _untag_inputs_before_partitioning() -> None:
    """Runs `_untag_inputs` as inductor's `joint_custom_post_pass` (after its pattern matcher, before the
    partitioner), process-wide. A pass already installed there is kept and runs first."""
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class UntagInputs(CustomGraphPass):
        vseg_untag_inputs = True  # what marks it installed (the class is made anew on each call)

        def __init__(self, before: Any) -> None:
            self.before = before

        def __call__(self, graph: torch.fx.Graph) -> None:
            if self.before is not None:
                self.before(graph)
            _untag_inputs(graph)

        def uuid(self) -> Any:  # inductor's FX graph cache keys on it; None (uncacheable) as for a pass without one
            if self.before is None:
                return "vseg.model.compile._untag_inputs/1"
            before = self.before.uuid() if isinstance(self.before, CustomGraphPass) else None
            return None if before is None else ("vseg.model.compile._untag_inputs/1", before)

    current = config.joint_custom_post_pass
    if not getattr(current, "vseg_untag_inputs", False):  # once per process
        config.joint_custom_post_pass = UntagInputs(current)


def uses_cuda_graphs(mode: str | None) -> bool:
    """Whether inductor records CUDA graphs in `torch.compile` mode `mode`."""
    return mode in ("reduce-overhead", "max-autotune")


def allow_cuda_graphs() -> None:
    """Lets each layer of a block stack record its own CUDA graph of their shared compiled function.

    Blocks of one class share one compiled function, but each layer's weights live at other addresses, so each
    layer records a graph of its own; inductor counts those as unexpected re-recordings and, past its limit
    (128), runs the function without graphs. A 36-layer LLM in training records 72 per token length."""
    from torch._inductor import config

    limit = getattr(config.triton, "cudagraph_unexpected_rerecord_limit", None)
    if limit is not None and limit < RERECORD_LIMIT:
        config.triton.cudagraph_unexpected_rerecord_limit = RERECORD_LIMIT


def step_begin() -> None:
    """Marks the start of a forward for the CUDA-graph trees (earlier outputs may now be overwritten)."""
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
    if mark is not None:
        mark()


def keep_graph_order() -> None:
    """Dynamo looks a block's compiled graphs up in the order they were made, not most recently used first.

    Why (training with gradient checkpointing): checkpointing runs a block's forward again in the backward pass,
    on autograd's device thread for CUDA tensors. When the block's code has more than one valid graph, the
    most-recently-used lookup can choose another graph for that recomputation than the forward used, and
    checkpointing stops with "a different number of tensors was saved" (pytorch/pytorch#166926; torchtitan
    turns the reordering off the same way). Process-wide; a no-op on torch builds without the switch.
    """
    setter = getattr(torch._C._dynamo.eval_frame, "_set_lru_cache", None)
    if setter is not None:
        setter(False)


def suspend_compiled(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """Runs the compiled blocks of `model` eagerly until `resume_compiled` (training's validation: its
    gradient-free forward would compile every block class once more, minutes on a GPU, for a few batches)."""
    saved = [(b, b._compiled_call_impl) for b in repeated_blocks(model) if b._compiled_call_impl is not None]
    for block, _ in saved:
        block._compiled_call_impl = None
    return saved


def resume_compiled(saved: list[tuple[nn.Module, Any]]) -> None:
    """Puts back the compiled blocks `suspend_compiled` took out (their compiled graphs are reused)."""
    for block, compiled in saved:
        block._compiled_call_impl = compiled


def uncompile_blocks(model: nn.Module) -> None:
    """Puts every repeated block of `model` back to eager execution (undoes `compile_blocks`).

    Needed when the blocks' parameters change dtype in place (`speed.bf16_weights` restoring its float32
    masters): a compiled graph specialised for the old dtype must not run on the new storage.
    """
    suspend_compiled(model)  # and nothing kept to resume
    for block in repeated_blocks(model):
        if getattr(block, "_vseg_checkpointed", False):  # checkpointing goes back to transformers
            block.gradient_checkpointing = True
            del block._vseg_checkpointed
