"""Training benchmark on the device machine: real-size Sa2VA shapes x strategies x GPU counts.

Every configuration runs the real entry point (`python train.py ...`, Lightning, the chosen strategy) on
512-px vessel images (1 InternVL tile + 1024-px SAM-2 input, random weights) for a few optimizer steps. The
images are vseg's synthetic ones, written once as PNG files and read with `data=folders`, as users' folders
are (`--inputs png`, the default): drawing them on the fly (`--inputs synthetic`) costs ~115 ms per image in
the loader's workers, which fell behind a compiled 4B step at micro-batch 32 (93 samples/s) once their
read-ahead ran out; `vseg.training.monitor.PerfMonitor` writes the median samples/s after warm-up, the counted FLOPs and every
GPU's peak memory, and this script collects one JSON row per configuration into `--out` (rewritten after
each row, so a run cut short keeps what it measured). `--cap-gb 23` caps each process's CUDA allocator to
mimic a 24 GB card. Example (one H200):

    python bench/train.py --models sa2va_4b --strategies single --devices 1 --batch 8 \
        --out bench/results/train_h200.json

`--feature-cache none,disk` adds rows with the disk cache of the frozen encoders' outputs (`vseg cache` with the
same overrides fills it first; its time is `cache_fill_s`), e.g. 4B with vs without at micro-batch 2 and 8:

    python bench/train.py --models sa2va_4b --batch 2,8 --feature-cache none,disk --steps 12 \
        --out bench/results/train_h200_diskcache.json

`--profile MODEL` instead times the parts of one training step in-process (no Lightning) and prints the
torch.profiler table of the heaviest CUDA kernels, for batch sizes and gradient checkpointing on/off.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def overrides(
    model: str,
    strategy: str,
    devices: int,
    batch: int,
    accum: int,
    steps: int,
    ckpt: bool,
    cap: float | None,
    perf: Path,
    run_dir: Path,
    image: int,
    workers: int = 4,
    flops_step: int = 2,
    sam_cache: str = "none",
    feature_cache: Path | None = None,
    log_every: int = 1,
    pngs: Path | None = None,
) -> list[str]:
    samples = sample_count(batch, accum, devices)
    # the same images either way: `pngs` holds the synthetic set written out by `write_pngs`
    inputs = ["data=folders", f"data.root={pngs}"] if pngs else ["data=synthetic", f"data.num_samples={samples}"]
    out = [
        f"model={model}",
        "trainer=gpu",
        f"strategy={strategy}",
        f"trainer.devices={devices}",
        *inputs,
        f"data.image_size={image}",
        "data.repeats=50",
        f"data.batch_size={batch}",
        f"data.num_workers={workers}",
        "data.split.val_fraction=0.125",
        f"trainer.accumulate_grad_batches={accum}",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=-1",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "trainer.val_check_interval=null",
        "trainer.check_val_every_n_epoch=1000",
        # the throughput window: the monitor waits for the GPU at each window's end (1: every step stands alone)
        f"trainer.log_every_n_steps={log_every}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "checkpoint.every_n_steps=100000",
        "checkpoint.save_last=false",
        f"model.gradient_checkpointing={str(ckpt).lower()}",
        "++model.init_device=cuda",
        f"callbacks.perf_json={perf}",
        # counted once (-1: never); the peak statistics restart after that micro-batch
        f"callbacks.flops_step={flops_step}",
        f"model.sam_feature_cache={sam_cache}",
        f"run_dir={run_dir}",
        "faults.check_grads=false",
    ]
    if cap:
        out.append(f"callbacks.memory_cap_gb={cap}")
    if feature_cache is not None:  # the disk cache of the frozen encoders' outputs, filled before the timed run
        out += ["feature_cache.enabled=true", f"feature_cache.dir={feature_cache}"]
    return out


def sample_count(batch: int, accum: int, devices: int) -> int:
    """Images in a benchmark's set: two optimizer steps' worth, at least 16 (each is repeated 50 times)."""
    return max(16, batch * accum * devices * 2)


def write_pngs(root: Path, count: int, size: int) -> Path:
    """`data=synthetic`'s first `count` images (seed 0) as `<id>.png` + `masks/<id>.png` under `root/<count>x<size>`,
    written once (a folder already complete is reused)."""
    import numpy as np
    from PIL import Image

    from vseg.config import DataConfig
    from vseg.data.sources import synthetic_records
    from vseg.data.synthetic import generate_vessels

    folder = root / f"{count}x{size}"
    done = folder / "complete"
    if done.is_file():
        return folder
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for record in synthetic_records(DataConfig(source="synthetic", num_samples=count, image_size=size)):
        image, mask = generate_vessels(*record.synthetic)
        Image.fromarray(image).save(folder / f"{record.id}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{record.id}.png")
    done.write_text("")
    return folder


def run_one(
    args: argparse.Namespace,
    model: str,
    strategy: str,
    devices: int,
    batch: int,
    ckpt: bool,
    extra: list[str] | None = None,
    label: str = "",
    disk: bool = False,
) -> dict:
    """One `train.py` run; `extra` overrides are appended (e.g. `speed.*`), `label` names them in the work dir;
    `disk`: with the disk feature cache (filled by `vseg cache` first)."""
    tag = f"{model}_{strategy}_d{devices}_b{batch}x{args.accum}_gc{int(ckpt)}" + (
        f"_cap{args.cap_gb:g}" if args.cap_gb else ""
    )
    tag += f"_sam{args.sam_cache}" if args.sam_cache != "none" else ""
    tag += f"_{label}" if label else ""
    tag += "_disk" if disk else ""
    work = Path(args.workdir) / tag
    perf = work / "perf.json"
    pngs = None
    if getattr(args, "inputs", "png") == "png":
        samples = sample_count(batch, args.accum, devices)
        pngs = write_pngs(Path(args.workdir) / "pngs", samples, args.image_size)
    config = overrides(
        model,
        strategy,
        devices,
        batch,
        args.accum,
        args.steps,
        ckpt,
        args.cap_gb,
        perf,
        work / "run",
        args.image_size,
        args.workers or min(15, max(1, (os.cpu_count() or 2) // devices - 1)),
        args.flops_step,
        args.sam_cache,
        # one directory for every run: entries are keyed by the encoders' inputs and the model's identity, so a
        # later run's `vseg cache` pass finds the images an earlier run encoded and skips them
        Path(args.workdir) / "feature_cache" if disk else None,
        getattr(args, "log_every", 1),
        pngs,
    )
    config += list(extra or [])
    cmd = [sys.executable, "train.py", *config]
    row = {
        "model": model,
        "strategy": strategy,
        "devices": devices,
        "micro_batch": batch,
        "accumulation": args.accum,
        "grad_ckpt": ckpt,
        "image_size": args.image_size,
        "memory_cap_gb": args.cap_gb,
        "sam_feature_cache": args.sam_cache,
        "disk_feature_cache": disk,
        "inputs": "png" if pngs else "synthetic",
        "steps": args.steps,
        "log_every_n_steps": getattr(args, "log_every", 1),
        "command": "python " + " ".join(cmd[1:]),
    }
    if disk:  # `vseg cache` with the same overrides: every timed step then reads its frozen features from disk
        start = time.perf_counter()
        fill = [sys.executable, "-m", "vseg.cli", "cache", *config]
        proc = subprocess.run(fill, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
        row.update(cache_command="python " + " ".join(fill[1:]), cache_fill_s=round(time.perf_counter() - start, 1))
        if proc.returncode != 0:
            row.update(status="error", returncode=proc.returncode, tail=(proc.stdout + proc.stderr)[-2500:])
            return row
        row["cache_report"] = proc.stdout.strip().splitlines()[-3:]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output, rc = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else str(err.stdout or ""), -9
    row["wall_s"] = round(time.perf_counter() - start, 1)
    work.mkdir(parents=True, exist_ok=True)
    (work / "console.log").write_text(output)  # what a user of this run would have seen, kept to be read
    row["console"] = str(work / "console.log")
    if rc == 0 and perf.is_file():
        summary = json.loads(perf.read_text())
        row.update(status="ok", **summary)
        if summary.get("samples_per_s") and summary.get("tokens_per_s"):
            row["seq_len"] = round(summary["tokens_per_s"] / summary["samples_per_s"], 1)
    else:
        oom = "OutOfMemoryError" in output or "CUDA out of memory" in output
        row.update(status="oom" if oom else ("timeout" if rc == -9 else "error"), returncode=rc, tail=output[-2500:])
    return row


def _train_step(model, opt, b: dict, times: dict, timed: bool) -> None:
    """One forward/backward/AdamW step under bf16 autocast; CUDA-event times of its parts into `times`."""
    import torch

    ev = [torch.cuda.Event(enable_timing=True) for _ in range(6)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ev[0].record()
        hidden = model.decoder_states(b["input_ids"], b["attention_mask"], b["mllm_inputs"])
        ev[1].record()
        llm, _ = model.llm_loss(hidden, b["labels"])
        prompts, idx = model.seg_embeddings(hidden, b["input_ids"])
        feats = model.grounding.encode(b["sam_pixel_values"])
        ev[2].record()
        masks = model.grounding.decode(feats, prompts, idx)
        loss = llm + masks.float().sigmoid().mean()
        ev[3].record()
    loss.backward()
    ev[4].record()
    opt.step()
    opt.zero_grad(set_to_none=True)
    ev[5].record()
    if timed:
        torch.cuda.synchronize()
        for name, (a, z) in {
            "vision+llm_fwd": (0, 1),
            "sam_encoder": (1, 2),
            "decode+loss": (2, 3),
            "backward": (3, 4),
            "optimizer": (4, 5),
            "total": (0, 5),
        }.items():
            times.setdefault(name, []).append(ev[a].elapsed_time(ev[z]))


def profile(model_name: str, batches: list[int], steps: int = 6) -> None:
    """Per-part timings of one training step, and the heaviest CUDA kernels, in-process."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sys.path.insert(0, str(ROOT / "tests"))
    from vseg.artifacts import build_sa2va
    from vseg.config import load_config
    from vseg.model.processor import Sa2VAProcessor

    from conftest import compose_cfg

    for ckpt in (True, False):
        cfg = load_config(compose_cfg([f"model={model_name}", "trainer=gpu", f"model.gradient_checkpointing={ckpt}"]))
        torch.manual_seed(0)
        with torch.device("cuda"):
            model, tok = build_sa2va(cfg.model, cfg.lora)
        model.train()
        proc = Sa2VAProcessor.for_model(model, tok, cfg.model, 512)
        rng = np.random.default_rng(0)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        for batch in batches:
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
            b = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in b.items()}
            b["mllm_inputs"] = {k: v.cuda() for k, v in b["mllm_inputs"].items()}
            torch.cuda.reset_peak_memory_stats()
            times: dict[str, list[float]] = {}

            try:
                for i in range(steps):
                    _train_step(model, opt, b, times, i >= 2)
            except torch.OutOfMemoryError:
                print(f"[profile] {model_name} batch {batch} grad_ckpt {ckpt}: OOM", flush=True)
                opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                continue
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            print(
                f"[profile] {model_name} batch {batch} grad_ckpt {ckpt}: {batch / med['total'] * 1000:.1f} samples/s, "
                f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, ms: "
                + ", ".join(f"{k} {v:.1f}" for k, v in med.items()),
                flush=True,
            )
            if ckpt and batch == batches[0]:
                with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                    _train_step(model, opt, b, times, False)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
        model = opt = None
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sa2va_4b")
    parser.add_argument("--strategies", default="single")
    parser.add_argument("--devices", default="1")
    parser.add_argument("--batch", default="8", help="micro-batches per device, comma-separated")
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--log-every", type=int, default=1, help="trainer.log_every_n_steps: steps per throughput window"
    )
    parser.add_argument("--grad-ckpt", default="on", help="on, off or on,off")
    parser.add_argument("--cap-gb", type=float, default=None)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data.num_workers per process (default: cores / devices - 1, at most 15; synthetic 512-px images cost ~150 ms "
        "each to draw and preprocess, so too few workers cap samples/s)",
    )
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument(
        "--inputs",
        default="png",
        choices=["png", "synthetic"],
        help="png: the synthetic images written once as files (data=folders); synthetic: drawn by the workers",
    )
    parser.add_argument(
        "--sam-cache",
        default="none",
        choices=["none", "gpu", "cpu"],
        help="model.sam_feature_cache: reuse each image's frozen SAM-2 features on its repeats (data.repeats=50)",
    )
    parser.add_argument(
        "--feature-cache",
        default="none",
        help="none, disk or none,disk: feature_cache.enabled (the frozen SAM-2 and vision-tower outputs on local disk, "
        "filled by `vseg cache` before the timed run; its time is reported as cache_fill_s)",
    )
    parser.add_argument(
        "--flops-step",
        type=int,
        default=2,
        help="micro-batch whose FLOPs are counted for MFU (-1: none; counting holds the activations "
        "gradient checkpointing would drop, so capped large-model rows may need -1)",
    )
    parser.add_argument("--set", default="", help="more train.py overrides, comma-separated (speed.compile=true)")
    parser.add_argument("--workdir", default="/tmp/vseg_bench")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", default=None, help="model config to profile in-process instead")
    args = parser.parse_args()
    if args.profile:
        profile(args.profile, [int(b) for b in args.batch.split(",")])
        return
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    out = Path(args.out or ROOT / "bench" / "results" / f"train_{device.split()[-1].lower()}.json")
    data = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    data.update(device=device, gpus_visible=torch.cuda.device_count(), date=time.strftime("%Y-%m-%d"))
    for model in args.models.split(","):
        for devices in (int(d) for d in args.devices.split(",")):
            for strategy in args.strategies.split(","):
                if strategy == "single" and devices != 1:
                    continue
                for batch in (int(b) for b in args.batch.split(",")):
                    for ckpt, disk in (
                        (c == "on", d == "disk")
                        for c in args.grad_ckpt.split(",")
                        for d in args.feature_cache.split(",")
                    ):
                        extra = [o for o in args.set.split(",") if o]
                        label = "_".join(o.replace("=", "-") for o in extra)
                        row = run_one(args, model, strategy, devices, batch, ckpt, extra, label, disk=disk)
                        row["device"] = device
                        data["rows"].append(row)
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_text(json.dumps(data, indent=1))
                        brief = {
                            k: row.get(k)
                            for k in (
                                "model",
                                "strategy",
                                "devices",
                                "micro_batch",
                                "grad_ckpt",
                                "disk_feature_cache",
                                "cache_fill_s",
                                "memory_cap_gb",
                                "status",
                                "samples_per_s",
                                "mfu",
                                "peak_allocated_gb",
                                "peak_reserved_gb",
                                "cpu_rss_gb",
                                "wall_s",
                            )
                        }
                        print(json.dumps(brief), flush=True)
                        if row["status"] != "ok":
                            print(row.get("tail", "")[-1500:], flush=True)


if __name__ == "__main__":
    main()
