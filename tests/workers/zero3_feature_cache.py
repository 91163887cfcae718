"""Two-rank DeepSpeed ZeRO-3 on the CPU (gloo) with the disk feature cache, run by tests/test_feature_cache.py.

Usage: zero3_feature_cache.py MASTER_PORT RANK CACHE_DIR. Each rank partitions the tiny Sa2VA, then runs
three forwards through the training module with the cache on:
  1. its own batch A, nothing on disk: every rank encodes and writes;
  2. rank 0 batch A again (all on disk), rank 1 a new batch B: rank 0 must still join the encoders' gathers;
  3. batch A on both ranks, everything on disk: no rank calls the partitioned encoders at all;
then one optimizer step on cached features. A rank that skipped an encoder the other ran would hang in
its gather (the test's timeout). Prints a JSON report: encoder calls and losses per phase, and the losses
of the unpartitioned model on the same batches.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE="2", RANK=sys.argv[2], LOCAL_RANK=sys.argv[2])
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import deepspeed  # noqa: E402
import torch  # noqa: E402

from vseg.artifacts import build_sa2va  # noqa: E402
from vseg.artifacts.feature_store import content_key  # noqa: E402
from vseg.config import StrategyConfig  # noqa: E402
from vseg.model.build import apply_training_setup  # noqa: E402
from vseg.model.processor import Sa2VAProcessor  # noqa: E402
from vseg.strategy import deepspeed_config  # noqa: E402
from vseg.training.feature_cache import any_rank  # noqa: E402
from vseg.training.module import Sa2VAModule, _one_dtype_for_zero3  # noqa: E402
from vseg.training.zero3 import build_sa2va_zero3  # noqa: E402

from conftest import random_batch, tiny_cfg  # noqa: E402


def with_keys(batch: dict) -> dict:
    """The content keys the dataset adds (one tile per sample in the tiny model)."""
    pixels = batch["mllm_inputs"]["pixel_values"]
    batch["content_keys"] = [
        {"sam": content_key(batch["sam_pixel_values"][i]), "vision": content_key(pixels[i : i + 1]), "tiles": 1}
        for i in range(len(batch["ids"]))
    ]
    return batch


def total(sums) -> torch.Tensor:
    return sums.mask_bce + sums.mask_dice + sums.llm


def main() -> None:
    os.environ["MASTER_PORT"] = sys.argv[1]
    rank = int(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    # No trainable token rows: PEFT initialises them under ZeRO-3 on a CUDA device on every rank but 0.
    rows = "lora.train_new_token_rows=false"
    cfg = tiny_cfg([rows, "feature_cache.enabled=true", f"feature_cache.dir={sys.argv[3]}"])
    torch.manual_seed(0)
    base, tokenizer = build_sa2va(cfg.model, None)
    processor = Sa2VAProcessor.for_model(base, tokenizer, cfg.model, cfg.data.max_length)
    batch_a = with_keys(random_batch(processor, seed=10 + rank))
    batch_b = with_keys(random_batch(processor, seed=20 + rank))

    reference = copy.deepcopy(base)
    apply_training_setup(reference, cfg.lora, tokenizer)
    plain = Sa2VAModule(reference, tiny_cfg([rows]))
    with torch.no_grad():
        want = {"A": float(total(plain._forward(batch_a)[1])), "B": float(total(plain._forward(batch_b)[1]))}

    ds = deepspeed_config(StrategyConfig(name="zero3", stage=3), micro_batch=2)
    ds["bf16"] = {"enabled": True}
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter really partitioned
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model, _, _hf = build_sa2va_zero3(cfg.model, cfg.lora, ds, base=base)
    _one_dtype_for_zero3(model, ds)
    module = Sa2VAModule(model, cfg)
    module._any_rank = lambda flag: any_rank(flag, "cpu")  # what the module does under multi-rank ZeRO-3
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=[p for p in module.parameters() if p.requires_grad], config=ds
    )
    calls = {"sam": 0, "vision": 0}
    model.grounding.sam.vision_encoder.register_forward_pre_hook(lambda *_: calls.__setitem__("sam", calls["sam"] + 1))
    tower = model.base_mllm.model.vision_tower
    tower.register_forward_pre_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1))

    phases = []
    for name, batch in (("1", batch_a), ("2", batch_a if rank == 0 else batch_b), ("3", batch_a)):
        calls.update(sam=0, vision=0)
        with torch.no_grad():
            loss = float(total(module._forward(batch)[1]))
        phases.append({"phase": name, "calls": dict(calls), "loss": loss})
    calls.update(sam=0, vision=0)
    loss = total(module._forward(batch_a)[1])
    engine.backward(loss)
    engine.step()
    step = {"calls": dict(calls), "loss": float(loss.detach())}
    stats = {p: vars(s.stats) for p, s in module.feature_cache.stores.items()}
    print(
        "REPORT " + json.dumps({"rank": rank, "want": want, "phases": phases, "step": step, "stats": stats}), flush=True
    )


if __name__ == "__main__":
    main()
