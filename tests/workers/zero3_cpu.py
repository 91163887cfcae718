"""One-process DeepSpeed ZeRO-3 on the CPU accelerator (gloo), run by tests/test_zero3_cpu.py.

Usage: zero3_cpu.py MASTER_PORT [config overrides...]. Partitions a tiny Sa2VA the way a ZeRO-3 run does (`build_sa2va_zero3` on a CPU-built base), compares its
step-0 loss with the same model unpartitioned, trains two steps, saves a DeepSpeed checkpoint directory and
reads it back as predict.py does, and prints a JSON report. With one rank
ZeRO-3 still empties every parameter outside its module's forward/backward, so any read that DeepSpeed does
not know about fails here just as it does on GPUs.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the checkout and its conftest helpers

import torch  # noqa: E402

# PEFT's ZeRO-3 token-row initialisation names a CUDA device for ranks other than 0; this run has rank 0 only.
torch.cuda.current_device = lambda: 0

import deepspeed  # noqa: E402

from vseg.artifacts import build_sa2va  # noqa: E402
from vseg.config import StrategyConfig  # noqa: E402
from vseg.losses import LossSums  # noqa: E402
from vseg.model.build import apply_training_setup  # noqa: E402
from vseg.model.processor import Sa2VAProcessor  # noqa: E402
from vseg.strategy import deepspeed_config  # noqa: E402
from vseg.training.module import Sa2VAModule, _one_dtype_for_zero3  # noqa: E402
from vseg.training.zero3 import build_sa2va_zero3, lora_init_report  # noqa: E402

from conftest import random_batch, tiny_cfg  # noqa: E402


def total(sums: LossSums) -> torch.Tensor:
    return sums.mask_bce + sums.mask_dice + sums.llm


def token_rows(model: torch.nn.Module) -> torch.Tensor:
    """The trainable [SEG]/... embedding rows, gathered (collective under ZeRO-3)."""
    (delta,) = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n and "embed" in n]
    with deepspeed.zero.GatheredParameters([delta]):
        return delta.detach().float().clone()


def main() -> None:
    os.environ["MASTER_PORT"] = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = tiny_cfg(["model.gradient_checkpointing=true", *sys.argv[2:]])
    torch.manual_seed(0)
    base, tokenizer = build_sa2va(cfg.model, None)
    processor = Sa2VAProcessor.for_model(base, tokenizer, cfg.model, cfg.data.max_length)
    batch = random_batch(processor)

    # Reference: the same weights unpartitioned. At step 0 LoRA B is zero and the token rows equal the
    # base rows, so the loss is the base model's whatever LoRA A is drawn.
    reference = copy.deepcopy(base)
    apply_training_setup(reference, cfg.lora, tokenizer)
    with torch.no_grad():
        ref_loss = float(total(Sa2VAModule(reference, cfg)._forward(batch)[1]))

    ds = deepspeed_config(StrategyConfig(name="zero3", stage=3), micro_batch=2)
    ds["bf16"] = {"enabled": True}
    # Nothing persistent: at tiny sizes every tensor would fall under the real threshold and stay gathered,
    # hiding reads that only fail for the partitioned tensors of real-size models.
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model, _, _hf = build_sa2va_zero3(cfg.model, cfg.lora, ds, base=base)
    _one_dtype_for_zero3(model, ds)
    partitioned = sum(p.numel() == 0 for p in model.parameters())
    module = Sa2VAModule(model, cfg)
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=[p for p in module.parameters() if p.requires_grad], config=ds
    )
    init = lora_init_report(model)
    rows_before = token_rows(model)
    losses = []
    for _ in range(2):
        loss = total(module._forward(batch)[1])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    rows_after = token_rows(model)

    # The checkpoint directory as a ZeRO-3 run writes it, read back the way predict.py reads a `ckpt=` directory.
    from deepspeed.utils import safe_get_full_fp32_param

    from vseg.artifacts.sources import deepspeed_model_states, read_trainable

    ckpt = Path(tempfile.mkdtemp()) / "step.ckpt"
    engine.save_checkpoint(str(ckpt), tag="checkpoint", exclude_frozen_parameters=True)
    got = read_trainable("deepspeed", deepspeed_model_states(ckpt))
    want = {n: safe_get_full_fp32_param(p).float() for n, p in model.named_parameters() if p.requires_grad}
    ckpt_diff = max((got[k] - want[k]).abs().max().item() for k in want) if set(got) == set(want) else None
    report = {
        "reference_loss": ref_loss,
        "losses": losses,
        "partitioned_params": partitioned,
        "token_rows_change": float((rows_after - rows_before).abs().max()),
        "checkpoint_keys_match": set(got) == set(want),
        "checkpoint_max_abs_diff": ckpt_diff,
        **init,
    }
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
