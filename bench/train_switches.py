"""Each `speed.*` switch on its own, in-process: vseg's model and losses, one build, no Lightning.

A `train.py` run costs ~40 s of start-up on one H200 before its first step, so a sweep over switches and
micro-batches through Lightning does not fit a short device call. This loop builds the vseg model once
(real shape, random bf16 weights made on the GPU), then for each variant times the step a `train.py` run
takes at its core: bf16 autocast, `Sa2VA.forward`, the mask BCE + Dice + answer-token CE losses, backward,
gradient clipping at 1.0 and AdamW (the module's non-fused AdamW), with `MasterWeights` around the
optimizer when `bf16_weights` is on, and the repeated blocks compiled in place (`vseg.model.compile`, undone
for variants without it) when `compile` is on; its warm-up steps include the compilation. Liger's patch
cannot be undone, so its variants run last. Lightning's
own per-step work (logging, callbacks, the loader) is not in these numbers: `bench/train_vs_plain.py`
measures the whole `train.py` path.

    python bench/train_switches.py --runs off:2:on,host_positions:2:on,bf16_weights:2:on,liger:2:on,all:2:on
    python bench/train_switches.py --runs host_positions:2:on,host_positions+compile:2:on   # switches combined
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from vseg.artifacts import build_sa2va  # noqa: E402
from vseg.config import load_config  # noqa: E402
from vseg.losses import mask_loss_sums  # noqa: E402
from vseg.model.compile import compile_blocks, uncompile_blocks  # noqa: E402
from vseg.model.processor import Sa2VAProcessor  # noqa: E402
from vseg.model.sa2va import Positions  # noqa: E402
from vseg.training.speed import MasterWeights, apply_liger  # noqa: E402

from conftest import compose_cfg  # noqa: E402

SWITCHES = ("bf16_weights", "liger", "host_positions", "compile")


def switches_of(variant: str) -> set[str]:
    """`off`, `all`, one switch, or switches joined by `+` (host_positions+compile)."""
    if variant in ("off", "all"):
        return set(SWITCHES) if variant == "all" else set()
    on = set(variant.split("+"))
    if not on <= set(SWITCHES):
        raise SystemExit(f"unknown switch in {variant!r}: off | all | switches joined by + from {SWITCHES}")
    return on


def make_batch(proc: Sa2VAProcessor, batch: int, device: str) -> dict:
    rng = np.random.default_rng(0)
    samples = [
        proc.encode(
            rng.integers(0, 255, (512, 512, 3), dtype=np.uint8),
            "Please segment the blood vessels in this image.",
            "It is [SEG].",
            rng.random((512, 512)) > 0.5,
        )
        for _ in range(batch)
    ]
    b = proc.collate(samples)
    b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
    b["mllm_inputs"] = {k: v.to(device) for k, v in b["mllm_inputs"].items()}
    return b


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_steps(model, b: dict, on: set[str], steps: int, warmup: int, device: str) -> list[float]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    masters = MasterWeights(named) if "bf16_weights" in on else None
    params = masters.masters if masters is not None else [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=4e-5, weight_decay=0.05)
    positions = Positions(b["seg_positions"], b["answer_positions"]) if "host_positions" in on else None
    times = []
    try:
        for step in range(warmup + steps):
            _sync(device)
            start = time.perf_counter()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                out = model(
                    b["input_ids"],
                    b["attention_mask"],
                    b["labels"],
                    b["sam_pixel_values"],
                    b["mllm_inputs"],
                    positions=positions,
                )
                bce, dice = mask_loss_sums(out.mask_logits, b["masks_low_res"], "low_res")
                n = out.mask_logits.shape[0]
                loss = (2.0 * bce + 0.5 * dice) / n + out.llm_loss_sum / out.llm_tokens
            loss.backward()
            if masters is not None:
                masters.grads_to_masters()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if masters is not None:
                masters.masters_to_model()
            _sync(device)
            if step >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        if masters is not None:
            masters.restore_fp32()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sa2va_4b")
    parser.add_argument("--runs", default="off:2:on,host_positions:2:on,bf16_weights:2:on,liger:2:on,all:2:on")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--set", default="", help="extra config overrides, comma-separated (e.g. model.dtype=bfloat16)")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test with model=tiny)")
    args = parser.parse_args()
    device = args.device
    cuda = device.startswith("cuda")
    extra = [o for o in args.set.split(",") if o]
    cfg = load_config(compose_cfg([f"model={args.model}", "trainer=gpu" if cuda else "trainer=default", *extra]))
    torch.manual_seed(0)
    with torch.device(device):
        model, tok = build_sa2va(cfg.model, cfg.lora)
    model.train()
    proc = Sa2VAProcessor.for_model(model, tok, cfg.model, 512)
    runs = [r.split(":") for r in args.runs.split(",")]
    runs.sort(key=lambda r: "liger" in switches_of(r[0]))  # Liger's patch is one-way: its variants last
    rows, liger_applied, bf16_traced = [], False, None
    for variant, batch, ckpt in runs:
        on = switches_of(variant)
        if "liger" in on and not liger_applied:
            liger_applied = apply_liger(model.base_mllm.model.language_model)
        if "compile" in on:
            if bf16_traced is not None and bf16_traced != ("bf16_weights" in on):
                torch._dynamo.reset()  # graphs traced for one LoRA weight dtype must not run on the other's storage
            bf16_traced = "bf16_weights" in on
            compile_blocks(model, dynamic=True)  # as train.py; in place, graphs stay cached between variants
        else:
            uncompile_blocks(model)
        if ckpt == "on":
            model.base_mllm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.base_mllm.gradient_checkpointing_disable()
        b = make_batch(proc, int(batch), device)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            times = timed_steps(model, b, on, args.steps, args.warmup, device)
            step_s = statistics.median(times)
            row = {"samples_per_s": round(int(batch) / step_s, 2), "s_per_step": round(step_s, 4), "status": "ok"}
        except torch.OutOfMemoryError:
            row = {"status": "oom"}
        row.update(
            stack="vseg_inprocess",
            variant=variant,
            micro_batch=int(batch),
            grad_ckpt=ckpt == "on",
            liger_applied=liger_applied and "liger" in on,
            peak_allocated_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            command="python bench/train_switches.py " + " ".join(sys.argv[1:]),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
