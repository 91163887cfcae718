"""speed: switches: each trains what the previous path trained (same losses on a fixed seed)."""

from __future__ import annotations

import pytest
import torch

import vseg.training.run as train_run
from vseg.model.sa2va import find_positions
from vseg.training.speed import MasterWeights, apply_liger, bf16_weights_apply

from conftest import random_batch, tiny_cfg

BUILD_TRAINER = train_run.build_trainer


def _forward(model, batch, positions=None):
    return model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        batch["sam_pixel_values"],
        batch["mllm_inputs"],
        positions=positions,
    )


def test_host_positions_give_exactly_the_boolean_gathers(built):
    model, _, processor = built
    batch = random_batch(processor, sizes=((60, 72), (50, 40), (64, 64)), seed=2)
    positions = find_positions(batch["input_ids"], batch["labels"], model.seg_token_id)
    assert torch.equal(batch["seg_positions"], positions.seg)  # the collate finds them in the loader's workers
    assert torch.equal(batch["answer_positions"], positions.answer)
    results = []
    for pos in (None, positions):
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        out = _forward(model, batch, pos)
        (out.llm_loss_sum + out.mask_logits.sigmoid().mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (old, old_grads), (new, new_grads) = results
    assert int(new.llm_tokens) == int(old.llm_tokens) > 0 and new.llm_tokens.device.type == "cpu"
    assert torch.equal(new.llm_loss_sum, old.llm_loss_sum)
    assert torch.equal(new.mask_logits, old.mask_logits) and torch.equal(new.seg_sample_index, old.seg_sample_index)
    assert old_grads.keys() == new_grads.keys() and len(old_grads) > 0
    for name, grad in old_grads.items():
        assert torch.equal(new_grads[name], grad), name


def test_an_unpadded_batch_trains_without_a_mask_exactly_as_with_one(built):
    """The collate knows on the host whether a row is padded; unpadded, training passes no attention mask (whose
    padding check in transformers waits for the GPU). Same losses, masks and gradients as with the mask."""
    model, _, processor = built
    same = random_batch(processor, seed=4)  # one prompt for both rows: nothing padded
    assert same["padded"] is False and bool(same["attention_mask"].all())
    results = []
    for mask in (same["attention_mask"], None):
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        out = model(same["input_ids"], mask, same["labels"], same["sam_pixel_values"], same["mllm_inputs"])
        (out.llm_loss_sum + out.mask_logits.sigmoid().mean()).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (old, old_grads), (new, new_grads) = results
    torch.testing.assert_close(new.llm_loss_sum, old.llm_loss_sum)
    torch.testing.assert_close(new.mask_logits, old.mask_logits)
    assert old_grads.keys() == new_grads.keys() and len(old_grads) > 0
    for name, grad in old_grads.items():
        torch.testing.assert_close(new_grads[name], grad, msg=name)
    assert _padded_batch(processor)["padded"] is True


def test_training_passes_no_mask_for_an_unpadded_batch_and_the_mask_for_a_padded_one(built, cfg):
    """What the training step hands the model: None for an unpadded batch, the collate's mask otherwise."""
    from vseg.training.module import Sa2VAModule

    model, _, processor = built
    seen = []
    forward = model.forward

    def spy(input_ids, attention_mask, *args, **kwargs):
        seen.append(attention_mask)
        return forward(input_ids, attention_mask, *args, **kwargs)

    module = Sa2VAModule(model, cfg)
    padded = _padded_batch(processor)
    model.forward = spy
    try:
        for batch in (random_batch(processor, seed=4), padded):
            module._forward(batch)
    finally:
        del model.forward
    assert seen[0] is None and seen[1] is padded["attention_mask"]


def test_a_padded_batch_gets_its_4d_mask_from_vseg_with_transformers_results(built, monkeypatch):
    """Padded rows: vseg builds the causal + padding mask on the device (`decoder_mask`), so transformers' padding
    check (`_ignore_causal_mask_sdpa`, a wait for the GPU) never runs; losses, masks and gradients are those of
    the 2-D mask that transformers expands itself."""
    import transformers.masking_utils as masking

    import vseg.model.families.internvl as internvl
    from vseg.model.families.base import to_device

    model, _, processor = built
    assert model.base_mllm.config.text_config._attn_implementation == "sdpa"
    batch = _padded_batch(processor)
    checks = []
    check = masking._ignore_causal_mask_sdpa
    monkeypatch.setattr(masking, "_ignore_causal_mask_sdpa", lambda *a, **k: checks.append(1) or check(*a, **k))
    results = []
    for make_mask in (lambda mask, device, config: to_device(mask, device), internvl.decoder_mask):
        monkeypatch.setattr(internvl, "decoder_mask", make_mask)
        checks.clear()
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        out = _forward(model, batch)
        (out.llm_loss_sum + out.mask_logits.sigmoid().mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads, len(checks)))
    (old, old_grads, old_checks), (new, new_grads, new_checks) = results
    assert old_checks > 0 and new_checks == 0  # transformers checked the 2-D mask; vseg's 4-D one goes in as is
    torch.testing.assert_close(new.llm_loss_sum, old.llm_loss_sum)
    torch.testing.assert_close(new.mask_logits, old.mask_logits)
    assert old_grads.keys() == new_grads.keys() and len(old_grads) > 0
    for name, grad in old_grads.items():
        torch.testing.assert_close(new_grads[name], grad, msg=name)


def test_the_4d_mask_is_made_only_where_transformers_would_make_the_same():
    from types import SimpleNamespace

    from vseg.model.families.base import decoder_mask

    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    full = SimpleNamespace(_attn_implementation="sdpa", layer_types=["full_attention"] * 2, sliding_window=None)
    made = decoder_mask(mask, torch.device("cpu"), full)
    assert made.shape == (2, 1, 3, 3) and made.dtype == torch.bool
    assert torch.equal(made[0, 0], torch.ones(3, 3, dtype=torch.bool).tril())
    assert torch.equal(made[1, 0], torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool))
    others = (
        SimpleNamespace(**{**vars(full), "_attn_implementation": "eager"}),  # eager adds a float mask
        SimpleNamespace(**{**vars(full), "_attn_implementation": "flash_attention_2"}),  # unpads from the 2-D one
        SimpleNamespace(**{**vars(full), "layer_types": ["full_attention", "sliding_attention"], "sliding_window": 2}),
    )
    for other in others:
        assert decoder_mask(mask, torch.device("cpu"), other) is mask
    # unpadded: no mask, as the ready per-layer-type mapping where the model takes one (no packed-sequence check)
    assert decoder_mask(None, torch.device("cpu"), full) is None  # a model of unknown type: None, as before
    qwen2 = SimpleNamespace(**{**vars(full), "model_type": "qwen2"})
    assert decoder_mask(None, torch.device("cpu"), qwen2) == {"full_attention": None}
    for other in others:
        assert (
            decoder_mask(None, torch.device("cpu"), SimpleNamespace(**{**vars(other), "model_type": "qwen2"})) is None
        )


def _decoder_inputs(model, batch, cached: bool) -> dict:
    if not cached:
        return batch["mllm_inputs"]
    features = model.family.frozen_image_features(model.base_mllm, batch["mllm_inputs"]["pixel_values"])
    return {**batch["mllm_inputs"], "image_features": features}


@pytest.mark.parametrize("cached", [False, True], ids=["pixels", "cached-features"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_the_llm_pass_reads_nothing_back_from_the_device(built, padded, cached):
    """Inside the MLLM's pass every tensor sits on the training device, so a value read back to the host (a
    Python bool or int of a tensor: `aten._local_scalar_dense`) is a wait for the GPU. transformers' own forward
    reads at least two (the image-placeholder count check, then the padding check or the packed-sequence
    check); vseg's reads none, and gives transformers' hidden states."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
                self.ops.append(func)
            return func(*args, **(kwargs or {}))

    model, _, processor = built
    batch = _padded_batch(processor) if padded else random_batch(processor, seed=4)
    assert batch["padded"] is padded
    mask = batch["attention_mask"] if padded else None  # as training hands it over (the collate's `padded`)
    inputs = _decoder_inputs(model, batch, cached)
    model.eval()
    try:
        with torch.no_grad():
            with Reads() as reads:
                ours = model.decoder_states(batch["input_ids"], mask, inputs)
            with Reads() as theirs:
                reference = model.base_mllm.model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    pixel_values=_normalised(model, batch["mllm_inputs"]["pixel_values"]),
                    use_cache=False,
                ).last_hidden_state
    finally:
        model.train()
    assert reads.ops == [] and len(theirs.ops) >= 2
    real = batch["attention_mask"].bool()  # padded positions differ (transformers' mask leaves them unmasked)
    torch.testing.assert_close(ours[real], reference[real])


def _normalised(model, pixel_values):
    from vseg.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalise

    return normalise(pixel_values, IMAGENET_MEAN, IMAGENET_STD).to(model.base_mllm.model.dtype)


def _padded_batch(processor) -> dict:
    """Two samples whose prompts differ in length: the shorter row is padded."""
    import numpy as np

    rng = np.random.default_rng(5)
    samples = [
        processor.encode(
            rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
            prompt,
            "It is [SEG].",
            rng.random((64, 64)) > 0.5,
            sample_id=f"s{i}",
        )
        for i, prompt in enumerate(("Segment the vessels, please, all of them.", "Segment all."))
    ]
    return processor.collate(samples)


def test_token_rows_keep_their_index_on_the_device_and_merge_as_peft_does(built):
    """[SEG] and the other added token rows: PEFT's merge (rebuilt per call from a Python list, a host copy that
    waits for the GPU) against vseg's layer, which makes the index once: same weights, same gradients."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    from vseg.model.build import TokenRowsOnDevice

    model, _, _ = built
    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]
    assert layers and all(type(m) is TokenRowsOnDevice for m in layers)
    for layer in layers:
        adapters = layer.active_adapters
        with torch.no_grad():
            layer.trainable_tokens_delta[adapters[0]].add_(0.25)  # rows that differ from the base weight
        try:
            ours = layer.get_merged_weights(adapters)
            peft = TrainableTokensLayer.get_merged_weights(layer, adapters)
            assert torch.equal(ours, peft) and not torch.equal(ours, layer.base_layer.weight)
            index = next(iter(layer._index_on_device.values()))
            layer.get_merged_weights(adapters)
            assert next(iter(layer._index_on_device.values())) is index  # made once, not per call
            ours.sum().backward()
            delta = layer.trainable_tokens_delta[adapters[0]]
            assert delta.grad is not None and bool((delta.grad != 0).all())
        finally:
            with torch.no_grad():
                layer.trainable_tokens_delta[adapters[0]].sub_(0.25)
            model.zero_grad(set_to_none=True)


def test_master_weights_round_trip():
    layer = torch.nn.Linear(4, 3)
    want = layer.weight.detach().clone()
    masters = MasterWeights(layer.named_parameters())
    assert layer.weight.dtype == torch.bfloat16 and masters.master_of(layer.weight).dtype == torch.float32
    assert torch.equal(masters.state()["weight"], want)  # the masters keep every bit of the float32 value
    layer.weight.grad = torch.ones_like(layer.weight)
    masters.grads_to_masters()
    assert layer.weight.grad is None and masters.master_of(layer.weight).grad.dtype == torch.float32
    masters.master_of(layer.weight).data += 1.0
    masters.masters_to_model()
    assert torch.equal(layer.weight.float(), (want + 1.0).bfloat16().float())
    masters.restore_fp32()
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, want + 1.0)
    assert bf16_weights_apply("bf16-mixed", deepspeed=False)
    assert not bf16_weights_apply("bf16-mixed", deepspeed=True) and not bf16_weights_apply("32-true", False)
    assert not bf16_weights_apply("bf16-mixed", False, "float32")


def test_liger_falls_back_cleanly_without_cuda(built, caplog):
    if torch.cuda.is_available():
        pytest.skip("CPU fallback only")
    model, _, _ = built
    with caplog.at_level("WARNING"):
        assert apply_liger(model.base_mllm.model.language_model) is False
    assert "speed.liger=true" in caplog.text


def _train_losses(monkeypatch, tmp_path, name: str, extra: list[str], probes=()) -> tuple[list[float], dict]:
    import lightning as L

    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    def with_record(*args):
        trainer = BUILD_TRAINER(*args)
        trainer.callbacks.extend([Record(), *probes])
        return trainer

    monkeypatch.setattr(train_run, "build_trainer", with_record)
    torch.manual_seed(0)
    base = [
        "trainer.precision=bf16-mixed",
        "model.dtype=bfloat16",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
    ]
    result = train_run.run(tiny_cfg([*base, f"run_dir={tmp_path / name}", *extra]))
    weights = {n: p.detach().clone() for n, p in result.module.named_parameters() if p.requires_grad}
    return losses, weights


@pytest.mark.slow
def test_bf16_weights_and_host_positions_train_the_same_losses(monkeypatch, tmp_path):
    """Under bf16 autocast a float32 weight is used as its bf16 rounding: the first step is bit-identical;
    later steps differ only by the bf16 rounding of trained weights used outside autocast (norms, token rows)."""
    old, old_weights = _train_losses(monkeypatch, tmp_path, "old", ["speed.host_positions=false"])
    new, new_weights = _train_losses(
        monkeypatch, tmp_path, "new", ["speed.bf16_weights=true", "speed.host_positions=true"]
    )
    assert len(old) == len(new) == 4
    assert new[0] == old[0]
    assert new == pytest.approx(old, rel=1e-3)  # measured: within 7e-5
    assert old_weights.keys() == new_weights.keys()
    # The masters are back in the model at the end (final weights and exports in float32). Weights are not
    # compared element-wise: Adam's update of a near-zero gradient is +-lr whatever its size, so the bf16
    # rounding of norms can flip single elements of the zero-initialised lora_B.
    assert all(w.dtype == torch.float32 for w in new_weights.values())


@pytest.mark.slow
def test_bf16_weights_checkpoint_the_float32_masters_and_resume_from_them(monkeypatch, tmp_path):
    import lightning as L

    base = ["trainer.precision=bf16-mixed", "model.dtype=bfloat16", "speed.bf16_weights=true"]
    base += [f"run_dir={tmp_path}", "checkpoint.every_n_steps=2", "trainer.val_check_interval=2"]
    train_run.run(tiny_cfg([*base, "trainer.max_steps=2"]))
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True, map_location="cpu")["state_dict"]
    lora = [v for k, v in saved.items() if "lora_B" in k]
    assert lora and all(v.dtype == torch.float32 for v in saved.values())
    assert any(not torch.equal(v, v.bfloat16().float()) for v in lora)  # float32 masters, not bf16 roundings
    seen = {}

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({k: v.clone() for k, v in pl_module.masters.state().items()})
            seen["dtype"] = next(p for n, p in pl_module.named_parameters() if "lora_B" in n).dtype

    def with_probe(*args):
        trainer = BUILD_TRAINER(*args)
        trainer.callbacks.append(AtStart())
        return trainer

    monkeypatch.setattr(train_run, "build_trainer", with_probe)
    train_run.run(tiny_cfg([*base, f"ckpt_path={last}", "trainer.max_steps=3"]))
    assert seen.pop("dtype") == torch.bfloat16
    assert seen.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(seen[name].cpu(), value), name  # resumed from the masters, bit for bit


@pytest.mark.slow
def test_compiled_blocks_train_the_same_losses_and_checkpoint_the_same_keys(monkeypatch, tmp_path, caplog):
    """speed.compile on the CPU, traced with "aot_eager" (inductor's C++ builds take minutes here): every
    repeated block runs compiled, under gradient checkpointing too, with the eager run's losses and state-dict
    names (blocks are compiled in place, no `_orig_mod.` prefix)."""
    import lightning as L

    import vseg.model.compile as C

    monkeypatch.setattr(C, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # 8 training images in batches of 2: no smaller last batch, whose new size would compile the image blocks again
    ckpt = ["model.gradient_checkpointing=true", "checkpoint.every_n_steps=4", "data.num_samples=9"]
    eager, eager_weights = _train_losses(monkeypatch, tmp_path, "eager", ckpt)
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    seen: dict[str, object] = {}

    class DuringValidation(L.Callback):
        """Validation runs the blocks eagerly (no gradient-free compilation) and training gets them back."""

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 0:  # after the module's own on_validation_epoch_start (callbacks run first)
                seen["graphs_before"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
                seen["eager"] = all(b._compiled_call_impl is None for b in C.repeated_blocks(pl_module.model))

        def on_validation_epoch_end(self, trainer, pl_module):
            seen["graphs_after"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])

        def on_train_end(self, trainer, pl_module):
            seen["compiled_after"] = all(b._compiled_call_impl is not None for b in C.repeated_blocks(pl_module.model))

    compiled, compiled_weights = _train_losses(
        monkeypatch, tmp_path, "compiled", [*ckpt, "speed.compile=true"], [DuringValidation()]
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the blocks ran as compiled graphs
    assert seen["eager"] and seen["graphs_after"] == seen["graphs_before"] > 0
    assert seen["compiled_after"]
    assert "speed.compile=true on the CPU" in caplog.text  # the cost of compiling on the CPU is said up front
    assert len(compiled) == len(eager) == 4
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert compiled_weights.keys() == eager_weights.keys()
    saved = torch.load(tmp_path / "compiled" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert not any("_orig_mod" in k for k in saved["state_dict"])
    torch._dynamo.reset()


def test_compile_is_refused_with_zero3():
    from vseg.config import ConfigError

    with pytest.raises(ConfigError, match="speed.compile=true is not supported with strategy=zero3"):
        tiny_cfg(["strategy=zero3", "speed.compile=true"])


def test_compile_under_gradient_checkpointing_keeps_dynamos_graph_order_and_warns_only_for_the_cpu(monkeypatch, caplog):
    """The recomputation in the backward must find the forward's graph (pytorch/pytorch#166926): with
    checkpointing, `speed.compile` turns off dynamo's most-recently-used lookup. The CPU warning follows where the
    strategy runs the model, not where its weights still are when the switches are applied."""
    import vseg.model.compile as C
    from vseg.artifacts import build_sa2va
    from vseg.training.speed import apply_speed

    calls: list[bool] = []
    monkeypatch.setattr(torch._C._dynamo.eval_frame, "_set_lru_cache", calls.append)
    for checkpointing, device in ((False, "cpu"), (True, "cuda")):
        caplog.clear()
        cfg = tiny_cfg([f"model.gradient_checkpointing={str(checkpointing).lower()}", "speed.compile=true"])
        model, _ = build_sa2va(cfg.model, cfg.lora)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        _, compiled, graphs = apply_speed(model, trainable, cfg, "bf16-mixed", False, False, device)
        assert not graphs  # speed.cuda_graphs is off
        assert compiled and all(b._compiled_call_impl is not None for b in C.repeated_blocks(model))
        assert ("speed.compile=true on the CPU" in caplog.text) == (device == "cpu")
        C.uncompile_blocks(model)
    assert calls == [False]  # once: only the run with checkpointing


def test_compiled_blocks_checkpoint_inside_their_graph_whatever_transformers_does(monkeypatch, built):
    """transformers 5.17 (simulated here) checkpoints a layer's `__call__`, outside its compiled region: the
    recomputation called the compiled forward a second time (an H200 profile: 36 calls of 3.7 ms of host time per
    step). vseg checkpoints inside the compiled function, so each block's graph holds the checkpoint and runs once
    per step; uncompiling hands checkpointing back to transformers.

    The graphs go through every pass of inductor up to code generation (skipped: no C++ builds here), with LoRA
    dropout and dynamic shapes, as train.py runs them: torch 2.11's partitioner failed there ("Node ... was
    invalid, but is output") until vseg untagged the graph inputs. The losses against eager checkpointing are
    the test above's (aot_eager, which draws eager's random numbers)."""
    import functools

    from functorch.compile import make_boxed_func
    from torch import nn
    from torch._inductor.compile_fx import compile_fx
    from transformers.modeling_layers import GradientCheckpointingLayer

    import vseg.model.compile as C

    def call_517(self, *args, **kwargs):  # transformers 5.17's GradientCheckpointingLayer.__call__, in short
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(functools.partial(nn.Module.__call__, self, **kwargs), *args)
        return nn.Module.__call__(self, *args, **kwargs)

    graphs: list[dict] = []

    def inductors_partitioning(gm, example_inputs):  # every pass up to code generation, which is skipped
        return compile_fx(gm, example_inputs, inner_compile=lambda graph, *_, **__: make_boxed_func(graph.forward))

    def backend(gm, example_inputs):
        graph = {"checkpoint": "tag_activation_checkpoint" in gm.code, "calls": 0}
        graphs.append(graph)
        compiled = inductors_partitioning(gm, example_inputs)

        def run(*args):
            graph["calls"] += 1
            return compiled(*args)

        return run

    monkeypatch.setattr(GradientCheckpointingLayer, "__call__", call_517)
    monkeypatch.setattr(C, "BACKEND", backend)
    model, _, processor = built
    model.base_mllm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    was_training = model.training
    model.train()
    llm = model.base_mllm.model.language_model  # its layers only: tracing every block of the model takes minutes
    layers = [b for b in C.repeated_blocks(llm) if getattr(b, "gradient_checkpointing", False)]
    assert layers
    assert any(isinstance(m, nn.Dropout) and m.p > 0 for m in llm.modules())  # the random ops 2.11 tripped on
    batches = [random_batch(processor, sizes=((60, 72), (50, 40)), seed=2), random_batch(processor, seed=3)]
    lora = {n: p for n, p in llm.named_parameters() if p.requires_grad}

    def step(batch):
        model.zero_grad(set_to_none=True)
        out = _forward(model, batch)
        (out.llm_loss_sum + out.mask_logits.sigmoid().mean()).backward()
        return {n: p.grad for n, p in lora.items()}

    torch._dynamo.reset()
    C.compile_blocks(llm, dynamic=True)
    try:
        assert not any(b.gradient_checkpointing for b in layers)
        compiled = [step(b) for b in batches]  # two prompt lengths: dynamic shapes
        for graph in graphs:
            graph["calls"] = 0
        step(batches[0])  # one step, once compiled: one call per layer
        checkpointed = [g for g in graphs if g["checkpoint"]]
        assert checkpointed and sum(g["calls"] for g in checkpointed) == len(layers)
    finally:
        C.uncompile_blocks(llm)
        model.base_mllm.gradient_checkpointing_disable()
        model.train(was_training)
        torch._dynamo.reset()
    assert all(not hasattr(b, "_vseg_checkpointed") for b in layers)
    for grads in compiled:  # every adapter of every layer learns, from finite gradients (B first: it starts at 0)
        assert all(g is not None and g.isfinite().all() for g in grads.values())
        assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_the_input_untagging_pass_installs_once_and_keeps_a_pass_already_there(monkeypatch):
    """Inductor has one joint_custom_post_pass slot: vseg's pass runs after one a user installed, keys the graph
    cache on both, and compiling again does not stack it a second time."""
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    import vseg.model.compile as C

    calls: list[str] = []

    class Theirs(CustomGraphPass):
        def __call__(self, graph):
            calls.append("theirs")

        def uuid(self):
            return "theirs/1"

    monkeypatch.setattr(config, "joint_custom_post_pass", Theirs())
    C._untag_inputs_before_partitioning()
    installed = config.joint_custom_post_pass
    C._untag_inputs_before_partitioning()
    assert config.joint_custom_post_pass is installed

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta.update(recompute="PREFER_RECOMPUTE", ac_graph_id=1)
    graph.output(graph.call_function(torch.neg, (x,)))
    installed(graph)
    assert calls == ["theirs"] and "recompute" not in x.meta and "ac_graph_id" not in x.meta
    assert "theirs/1" in installed.uuid()
    monkeypatch.setattr(config, "joint_custom_post_pass", lambda graph: None)  # no uuid: uncacheable, as alone
    C._untag_inputs_before_partitioning()
    assert config.joint_custom_post_pass.uuid() is None


@pytest.mark.gpu
def test_compiled_checkpoint_gives_eager_checkpointings_gradients_on_a_gpu(built):
    """The LLM's layers compiled by inductor with their checkpoint inside the graph (dynamic shapes, bf16
    autocast, two prompt lengths) give the losses and LoRA gradients of transformers' eager checkpointing.
    LoRA dropout off: inductor draws other random numbers than eager."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from torch import nn

    import vseg.model.compile as C

    model, _, processor = built
    model.cuda().train()
    model.base_mllm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    llm = model.base_mllm.model.language_model
    for m in llm.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    lora = {n: p for n, p in llm.named_parameters() if p.requires_grad}
    batches = [random_batch(processor, sizes=((60, 72), (50, 40)), seed=2), random_batch(processor, seed=3)]
    batches = [move_data_to_device(b, "cuda") for b in batches]

    def step(batch):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = _forward(model, batch)
        loss = out.llm_loss_sum + out.mask_logits.float().sigmoid().mean()
        loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in lora.items()}

    eager = [step(b) for b in batches]
    torch._dynamo.reset()
    C.compile_blocks(llm, dynamic=True)
    try:
        compiled = [step(b) for b in batches]
    finally:
        C.uncompile_blocks(llm)
        torch._dynamo.reset()
    for (loss, grads), (loss_c, grads_c) in zip(eager, compiled, strict=True):
        torch.testing.assert_close(loss_c, loss, rtol=2e-2, atol=1e-3)  # inductor's bf16 kernels round otherwise
        for name, grad in grads.items():
            scale = grad.abs().max().clamp_min(1e-6)
            assert (grads_c[name] - grad).abs().max() / scale < 5e-2, name


@pytest.mark.gpu
def test_compiled_blocks_train_under_gradient_checkpointing_on_a_gpu(monkeypatch, tmp_path):
    """The H200 failure this guards against: with CUDA tensors the backward (and checkpointing's recomputation)
    runs on autograd's device thread, where dynamo's most-recently-used lookup picked another graph than the
    forward's and checkpointing stopped ("a different number of tensors was saved"). The CPU test above cannot
    meet it: there the backward runs on the calling thread. Inductor, as train.py uses it."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    torch._dynamo.reset()
    # no LoRA dropout: inductor draws its own random numbers, so dropout would make the losses differ anyway
    ckpt = ["model.gradient_checkpointing=true", "trainer.accelerator=gpu", "trainer.devices=1", "lora.dropout=0.0"]
    eager, _ = _train_losses(monkeypatch, tmp_path, "eager", ckpt)
    compiled, _ = _train_losses(monkeypatch, tmp_path, "compiled", [*ckpt, "speed.compile=true"])
    assert len(compiled) == len(eager) == 4
    assert compiled == pytest.approx(eager, rel=2e-2)  # inductor's bf16 kernels round differently from eager's
    torch._dynamo.reset()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_overlapped_steps_train_exactly_what_waiting_steps_train(monkeypatch, tmp_path, device):
    """speed.overlap_steps: fused AdamW's device-side skip (no bad steps here: every step applied) and, on a GPU,
    batches copied on a side stream. Same losses and weights, bit for bit, as the guard that reads its flags on
    the host and batches copied on the compute stream."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    extra = ["trainer.accelerator=gpu", "trainer.devices=1"] if device == "cuda" else []
    waiting = _train_losses(monkeypatch, tmp_path, "waiting", [*extra, "speed.overlap_steps=false"])
    overlapped = _train_losses(monkeypatch, tmp_path, "overlapped", [*extra, "speed.overlap_steps=true"])
    assert len(overlapped[0]) == 4 and overlapped[0] == waiting[0]
    assert overlapped[1].keys() == waiting[1].keys()
    assert all(torch.equal(overlapped[1][n], waiting[1][n]) for n in waiting[1])


@pytest.mark.gpu
def test_side_stream_copy_is_waited_for_before_the_batch_is_used():
    """A 1 GiB pinned tensor takes tens of milliseconds to copy; a kernel on the (idle) compute stream that
    did not wait for the copy stream would read it half-written."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from vseg.training.speed import SideStreamCopy

    copy, device = SideStreamCopy(), torch.device("cuda", 0)
    batch = {"big": torch.ones(2**28).pin_memory(), "nested": [{"x": torch.arange(10).pin_memory()}], "ids": ["a"]}
    torch.cuda.synchronize()
    moved = copy(batch, device, move_data_to_device)
    complete = moved["big"].eq(1).all()  # queued on the compute stream right behind the copy
    assert bool(complete) and moved["nested"][0]["x"].tolist() == list(range(10)) and moved["ids"] == ["a"]
    assert copy.stream is not None and copy.stream != torch.cuda.current_stream(device)
