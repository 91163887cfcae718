"""speed.cuda_graphs: padded text, static LLM layers with CUDA graphs, gradients kept out of the graph pool."""

from __future__ import annotations

import pytest
import torch
from test_speed import _forward, _padded_batch, _train_losses

from vseg.config import ConfigError, load_config
from vseg.training.speed import GradsOutsideGraphs, apply_speed, cuda_graphs_apply

from conftest import compose_cfg, random_batch, tiny_cfg


def test_padding_to_a_multiple_changes_no_loss_mask_or_gradient():
    """The collate pads on the right to a multiple of `pad_multiple`: pads are label -100 and attention 0, the
    [SEG] and answer positions stay where they were, and the losses, masks and gradients are those of the batch
    padded to its longest row only (LoRA dropout off: its random mask has the text's shape)."""
    from vseg.artifacts import build_sa2va
    from vseg.model.processor import Sa2VAProcessor

    cfg = tiny_cfg(["lora.dropout=0.0"])
    torch.manual_seed(0)
    model, tokenizer = build_sa2va(cfg.model, cfg.lora)
    processor = Sa2VAProcessor.for_model(model, tokenizer, cfg.model, cfg.data.max_length)
    results = []
    for multiple in (1, 64):
        processor.pad_multiple = multiple
        batch = _padded_batch(processor)
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        out = _forward(model, batch)
        (out.llm_loss_sum + out.mask_logits.sigmoid().mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((batch, out, grads))
    (short, old, old_grads), (long, new, new_grads) = results
    length = short["input_ids"].shape[1]
    assert long["input_ids"].shape[1] == 64 * -(-length // 64) > length
    assert torch.equal(long["input_ids"][:, :length], short["input_ids"])
    assert (long["labels"][:, length:] == -100).all() and (long["attention_mask"][:, length:] == 0).all()
    assert torch.equal(long["seg_positions"], short["seg_positions"])
    assert torch.equal(long["answer_positions"], short["answer_positions"])
    assert long["num_tokens"] == short["num_tokens"] and long["padded"] is True
    torch.testing.assert_close(new.llm_loss_sum, old.llm_loss_sum)
    torch.testing.assert_close(new.mask_logits, old.mask_logits)
    assert old_grads.keys() == new_grads.keys() and len(old_grads) > 0
    for name, grad in old_grads.items():
        torch.testing.assert_close(new_grads[name], grad, msg=name)


def test_an_unpadded_batch_padded_to_a_multiple_becomes_a_padded_one(built):
    _, _, processor = built
    batch = random_batch(processor, seed=4)  # one prompt for both rows
    assert batch["padded"] is False
    processor.pad_multiple = 64
    try:
        padded = random_batch(processor, seed=4)
    finally:
        processor.pad_multiple = 1
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["padded"] is True


def test_backward_adds_into_the_gradients_kept_outside_the_graphs():
    """What `GradsOutsideGraphs` relies on: autograd adds into a gradient that is already there (in place, same
    storage) instead of keeping the incoming tensor, which under CUDA graphs would be a graph output; zeroing
    with set_to_none=False keeps that storage; a gradient dropped (a skipped bad step) is made again."""
    layer = torch.nn.Linear(4, 3)
    keep = GradsOutsideGraphs(layer.parameters())
    keep.ensure()
    storage = {id(p): p.grad.data_ptr() for p in layer.parameters()}
    x = torch.randn(5, 4)
    layer(x).sum().backward()
    layer(2 * x).sum().backward()  # a second micro-batch of an accumulation window
    expected = torch.ones(5, 3).t() @ (3 * x)
    torch.testing.assert_close(layer.weight.grad, expected)
    assert all(p.grad.data_ptr() == storage[id(p)] for p in layer.parameters())
    opt = torch.optim.AdamW(layer.parameters(), foreach=True)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad.data_ptr() == storage[id(p)] and not p.grad.any() for p in layer.parameters())
    layer.bias.grad = None
    keep.ensure()
    assert layer.bias.grad is not None and not layer.bias.grad.any()


def test_cuda_graphs_compile_the_llm_layers_static_with_graphs_only_where_they_apply(monkeypatch, caplog):
    """The LLM's layers compile for fixed shapes in inductor's reduce-overhead mode on CUDA without DeepSpeed;
    elsewhere the switch is ignored with a warning and the layers compile as before (dynamic, default mode)."""
    import vseg.model.compile as C
    import vseg.training.speed as S
    from vseg.artifacts import build_sa2va

    calls: list[tuple[str, bool | None, str | None]] = []
    announced: list[bool] = []

    def record(model, mode=None, dynamic=None, announce=True):
        calls.append((type(model).__name__, dynamic, mode))
        announced.append(announce)
        return C.Compiled({type(model).__name__: 1})

    monkeypatch.setattr(S, "compile_blocks", record)
    cfg = tiny_cfg(["speed.compile=true", "speed.cuda_graphs=true"])
    model, _ = build_sa2va(cfg.model, cfg.lora)
    llm = type(model.base_mllm.model.language_model).__name__
    for device, deepspeed, graphs in (("cuda", False, True), ("cuda", True, False), ("cpu", False, False)):
        calls.clear()
        caplog.clear()
        assert cuda_graphs_apply(cfg.speed, deepspeed, False, device) is graphs
        _, compiled, applied = apply_speed(model, [], cfg, "bf16-mixed", deepspeed, False, device)
        assert compiled and applied is graphs
        assert calls[0] == ((llm, False, "reduce-overhead") if graphs else (llm, True, None))
        assert ("speed.cuda_graphs=true is ignored" in caplog.text) is not graphs
    assert announced and all(announced)  # rank 0 says what it compiled
    announced.clear()
    monkeypatch.setattr(S.rank_zero_only, "rank", 1)
    apply_speed(model, [], cfg, "bf16-mixed", False, False, "cuda")
    assert announced and not any(announced)  # other ranks compile the same blocks silently
    assert not cuda_graphs_apply(tiny_cfg(["speed.compile=true"]).speed, False, False, "cuda")


def test_cuda_graphs_without_compile_is_a_config_error():
    with pytest.raises(ConfigError, match="speed.cuda_graphs=true.*needs speed.compile=true"):
        load_config(compose_cfg(["speed.cuda_graphs=true", "speed.compile=false"]))
    with pytest.raises(ConfigError, match="speed.pad_tokens=0"):
        load_config(compose_cfg(["speed.pad_tokens=0"]))


@pytest.mark.gpu
def test_cuda_graphs_train_the_losses_of_eager_layers_on_a_gpu(monkeypatch, tmp_path):
    """Two micro-batches per step (the second adds into gradients the first left, across a graph replay), with
    checkpointing: the losses of eager layers, and graphs were in fact replayed (no layer fell back)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    import lightning as L
    from torch._dynamo.utils import counters

    seen: dict = {}

    class Probe(L.Callback):
        def on_train_end(self, trainer, pl_module):
            seen["graphs"] = pl_module.graphs is not None
            seen["multiple"] = trainer.datamodule.processor.pad_multiple

    torch._dynamo.reset()
    counters.clear()
    base = [
        "model.gradient_checkpointing=true",
        "trainer.accelerator=gpu",
        "trainer.devices=1",
        "lora.dropout=0.0",  # inductor draws other random numbers than eager
        "trainer.accumulate_grad_batches=2",
    ]
    eager, _ = _train_losses(monkeypatch, tmp_path, "eager", base)
    graphs_on = ["speed.compile=true", "speed.cuda_graphs=true"]
    graphs, _ = _train_losses(monkeypatch, tmp_path, "graphs", [*base, *graphs_on], probes=[Probe()])
    assert seen == {"graphs": True, "multiple": 64}
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert len(graphs) == len(eager) == 8
    assert graphs == pytest.approx(eager, rel=2e-2)  # inductor's bf16 kernels round differently from eager's
    torch._dynamo.reset()


def test_the_host_side_of_graph_mode_trains_the_default_losses(monkeypatch, tmp_path):
    """Everything `speed.cuda_graphs` changes outside the graphs themselves, on the CPU, where graphs cannot run:
    text padded to 64 tokens, a graph step marked per micro-batch, gradients made before the first backward and
    zeroed in place, so both micro-batches of a step add into one storage per weight (gradients dropped between
    epochs are made again). The same losses as the default path (LoRA dropout off: its random mask has the
    text's shape)."""
    import lightning as L

    import vseg.training.module as M
    import vseg.training.run as R

    base = ["lora.dropout=0.0", "trainer.accumulate_grad_batches=2"]
    default, _ = _train_losses(monkeypatch, tmp_path, "default", base)

    def graphs_on(*args, **kwargs):
        masters, compiled, _ = apply_speed(*args, **kwargs)
        return masters, compiled or "nothing", True

    marks: list[int] = []
    storages: dict[tuple[int, int, str], set[int]] = {}  # (epoch, step, weight): gradient storages seen

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert batch["input_ids"].shape[1] % 64 == 0
            for name, p in pl_module.named_parameters():
                if p.requires_grad:
                    key = (trainer.current_epoch, batch_idx // 2, name)
                    storages.setdefault(key, set()).add(p.grad.data_ptr())

    monkeypatch.setattr(R, "cuda_graphs_apply", lambda *args: True)
    monkeypatch.setattr(M, "apply_speed", graphs_on)
    monkeypatch.setattr(M, "step_begin", lambda: marks.append(1))
    graphs, _ = _train_losses(monkeypatch, tmp_path, "graphs", base, probes=[Probe()])
    assert len(graphs) == len(default) == 8 and len(marks) == 8
    assert storages and all(len(ptrs) == 1 for ptrs in storages.values())
    assert graphs[:2] == default[:2]  # the first step: before any update, padding changes nothing
    # later steps: the padded text changes the matmuls' shapes, so bf16 sums round apart (measured: 7.4e-5)
    assert graphs == pytest.approx(default, rel=1e-3)


GRAPH_MODE_HOST_SIDE = """
import sys

sys.path.insert(0, {root!r})
import vseg.training.module as M
import vseg.training.run as R
from vseg.config import compose
from vseg.training.speed import apply_speed


def graphs_on(*args, **kwargs):
    masters, compiled, _ = apply_speed(*args, **kwargs)
    print("graph mode's host side: on", flush=True)
    return masters, compiled or "nothing", True


R.cuda_graphs_apply = lambda *args: True  # what a CUDA machine would decide
M.apply_speed = graphs_on
# train.py's run with its overrides; Lightning starts rank 1 as this script with the same arguments
R.run(compose("train", sys.argv[1:]))
"""


@pytest.mark.slow
def test_the_host_side_of_graph_mode_trains_the_default_weights_under_ddp(tmp_path):
    """Two gloo DDP ranks (DDP keeps gradients as views of its buckets): graph mode's host side, as in the test
    above, ends with the weights of default DDP training."""
    from safetensors.torch import load_file
    from test_feature_cache import _train_ddp

    from conftest import ROOT

    _train_ddp(tmp_path / "default", ["lora.dropout=0.0"])
    script = tmp_path / "graph_mode_host_side.py"
    script.write_text(GRAPH_MODE_HOST_SIDE.format(root=str(ROOT)))
    output = _train_ddp(tmp_path / "graphs", ["lora.dropout=0.0"], script=str(script))
    assert output.count("graph mode's host side: on") == 2  # both ranks
    want = load_file(tmp_path / "default" / "weights" / "trainable.safetensors")
    got = load_file(tmp_path / "graphs" / "weights" / "trainable.safetensors")
    assert got.keys() == want.keys()
    for name in want:  # the padded text changes the matmuls' shapes: float sums round apart
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("vseg_ddp", [True, False])
def test_ddp_wrapped_on_the_compute_stream_syncs_no_gradient_across_streams(vseg_ddp, tmp_path):
    """Lightning's own wrap (on a side stream) makes torch warn in every backward that DDP's gradient
    accumulators sit on another stream than the gradients' producers; `ComputeStreamDDP`'s does not. The
    Lightning case runs too, so the test shows it still catches the mismatch."""
    import warnings

    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy

    from vseg.strategy import ComputeStreamDDP

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        kind = ComputeStreamDDP if vseg_ddp else DDPStrategy
        strategy = kind(parallel_devices=[torch.device("cuda", 0)])
        model = strategy._setup_model(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()).cuda())
        torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                model(torch.randn(8, 64, device="cuda")).square().mean().backward()
        torch.cuda.synchronize()
        mismatch = [w for w in caught if "AccumulateGrad node's stream" in str(w.message)]
        assert bool(mismatch) != vseg_ddp
    finally:
        dist.destroy_process_group()
