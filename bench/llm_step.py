"""The LLM's training step alone, for the host cost of its compiled layers: eager, compiled, compiled + CUDA graphs,
compiled with inductor's C++ wrapper (`cpp-wrapper`: the same kernels, launched from C++), compiled with
inductor's combo kernels (`combo`: independent kernels fused side by side, fewer launches). A mode ending in
`-static` (`default-static`, `reduce-overhead-static`) runs one text length on every step and compiles for that
shape only (`dynamic=False`), as a batch padded to a fixed length would run.

A micro-batch-2 step of vseg is bound by the host issuing the LLM layers' kernels (BENCHMARKS.md, issue 21).
This isolates that part: the decoder stack of a vseg model preset (random bf16 weights on the GPU), PEFT LoRA
with the vseg recipe (`conf/lora/default.yaml`), gradient checkpointing, bf16 autocast, next-token loss on
every position, fused AdamW; each layer compiled as `vseg.model.compile.compile_blocks` compiles it. Two text
lengths alternate so the dynamic-shape path is the one timed. `--check` also runs each mode with dropout off
from the same weights and prints the largest loss difference to eager. Each mode runs in a process of its own.

    python bench/llm_step.py --modes eager,default,reduce-overhead --ckpt on,off --batch 2 --steps 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(model_yaml: Path, lora_yaml: Path, dropout: float | None, device: str, ckpt: bool):
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    text = dict(yaml.safe_load(model_yaml.read_text())["model"]["text"])
    lora = yaml.safe_load(lora_yaml.read_text())
    config = AutoConfig.for_model(text.pop("model_type"), **text)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    peft = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"] if dropout is None else dropout,
        target_modules=lora["target_modules"],
    )
    model = get_peft_model(model, peft)
    if ckpt:
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, config.vocab_size


def run(mode: str, args, dropout: float | None, steps: int) -> dict:
    import torch

    import vseg.model.compile as C

    torch._dynamo.reset()
    ckpt = args.ckpt == "on"
    model, vocab = build(Path(args.model_yaml), Path(args.lora_yaml), dropout, args.device, ckpt)
    cuda = args.device == "cuda"
    if mode == "cpp-wrapper":  # inductor's default kernels, launched from generated C++ instead of Python
        torch._inductor.config.cpp_wrapper = True
    if mode == "combo":  # independent small kernels (LoRA's, the norms') fused side by side: fewer launches
        torch._inductor.config.combo_kernels = True
    static = mode.endswith("-static")
    base = mode.removesuffix("-static")
    if base != "eager":
        compile_mode = None if base in ("default", "cpp-wrapper", "combo") else base
        C.compile_blocks(model.base_model.model.model, dynamic=not static, mode=compile_mode)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    gen = torch.Generator(device=args.device).manual_seed(1)
    times, losses = [], []
    for step in range(steps):
        length = args.length - (0 if static else 4 * (step % 2))
        ids = torch.randint(0, vocab - 10, (args.batch, length), device=args.device, generator=gen)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        if base == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(args.device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = times[args.warmup :]
    row = {
        "mode": mode,
        "ckpt": ckpt,
        "dropout": dropout,
        "batch": args.batch,
        "length": args.length,
        "ms_per_step": round(statistics.median(timed) * 1e3, 1) if timed else None,
        "first_steps_s": [round(t, 1) for t in times[: args.warmup]],
        "losses": [round(float(x), 5) for x in losses],
        "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def child_row(mode: str, ckpt: bool, dropout: float | None, steps: int, args) -> dict:
    """One mode in a process of its own: a mode that crashes the process (CUDA graphs died with a segmentation
    fault in their first trial) becomes a row, and the other modes still run."""
    # -X faulthandler: a segmentation fault still prints the Python stack it happened under
    cmd = [
        sys.executable,
        "-X",
        "faulthandler",
        __file__,
        "--one",
        mode,
        "--ckpt",
        "on" if ckpt else "off",
        "--steps",
        str(steps),
    ]
    cmd += ["--model-yaml", args.model_yaml, "--lora-yaml", args.lora_yaml, "--batch", str(args.batch)]
    cmd += ["--length", str(args.length), "--warmup", str(args.warmup), "--device", args.device]
    if dropout is not None:
        cmd += ["--dropout", str(dropout)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as err:
        tail = ((err.stdout or b"").decode() + (err.stderr or b"").decode())[-4000:]
        return {"mode": mode, "ckpt": ckpt, "dropout": dropout, "error": f"over {args.timeout} s", "tail": tail}
    rows = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and rows:
        return json.loads(rows[-1])
    text = proc.stdout + proc.stderr
    fatal = text.find("Fatal Python error")  # faulthandler's report: the stacks, then a long list of modules
    tail = text[fatal : fatal + 4000] if fatal >= 0 else text[-4000:]
    return {"mode": mode, "ckpt": ckpt, "dropout": dropout, "returncode": proc.returncode, "error": tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-yaml", default=str(ROOT / "conf/model/sa2va_4b.yaml"))
    parser.add_argument("--lora-yaml", default=str(ROOT / "conf/lora/default.yaml"))
    parser.add_argument("--modes", default="eager,default,reduce-overhead")
    parser.add_argument("--ckpt", default="on", help="gradient checkpointing: on, off or on,off (each mode both ways)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=300)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--check", action="store_true", help="also compare losses to eager with dropout off")
    parser.add_argument(
        "--device", default="cuda", help="cpu: a smoke run of the script (with --model-yaml conf/model/tiny.yaml)"
    )
    parser.add_argument("--timeout", type=int, default=400, help="seconds per mode")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process's mode
    parser.add_argument("--dropout", type=float, default=None, help="LoRA dropout (default: the recipe's)")
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run(args.one, args, args.dropout, args.steps)), flush=True)
        return
    rows = []
    settings = [c == "on" for c in args.ckpt.split(",")]
    for ckpt in settings:
        for mode in args.modes.split(","):
            rows.append(child_row(mode, ckpt, args.dropout, args.steps, args))
            print(json.dumps(rows[-1]), flush=True)
    if args.check:  # dropout off: inductor draws other random numbers than eager
        for ckpt in settings:
            reference = None
            for mode in args.modes.split(","):
                row = child_row(mode, ckpt, 0.0, 4, args)
                if mode == "eager":
                    reference = row.get("losses")
                elif reference and "losses" in row:
                    pairs = zip(row["losses"], reference, strict=True)
                    row["max_loss_diff_vs_eager"] = max(abs(a - b) for a, b in pairs)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
