"""Plain stack against vseg, training, in one call on one GPU: samples/s and the ratios between them.

First `bench/plain_train.py` (transformers + peft only, one process, every configuration), then vseg's `train.py`
once per run (`bench/train.py`'s `run_one`: Lightning, strategy `single`, synthetic 512-px images, written once as
PNG files, through loader workers). A vseg run is `VARIANT:MICRO_BATCH:CKPT[:disk]`, where VARIANT is `off` (every
`speed.*` switch off: the path before these switches), `all` (every switch on) or switches joined by `+`
(`bf16_weights`, `liger`, `host_positions`, `compile`, `overlap_steps`, `cuda_graphs`); `:disk` reads the frozen
SAM-2 and vision-tower features from the disk feature cache (`vseg cache` fills it first; the plain stack computes
them). vseg is timed in windows of `--log-every` steps, waiting for the GPU at each window's end as a user's run
does at each log step; the plain loop times each step alone. Ratios printed at the end: vseg / plain at each
micro-batch, best / best, and each switch against `off` at the same micro-batch. Rows go to `--out` after every
run.

Both stacks are bound by the host's CPU at small micro-batches, and the plain loop has moved by up to 29 %
between two runs in one call on one machine. `--plain-again` runs it once more after the vseg runs; the
ratios then divide by the faster of its two passes (the ratio least favourable to vseg), and the spread
between them is printed with the ratios. Every row records the host as it started and ended (`host`, `host_after`:
CPU model, cores, mean clock, load average), to tell a slower host from a slower stack when calls disagree.

    python bench/train_vs_plain.py --out bench/results/plain_vs_vseg_train_h200.json
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
sys.path.insert(0, str(ROOT / "bench"))

from train import run_one  # noqa: E402  (bench/train.py)

SWITCHES = ("bf16_weights", "liger", "host_positions", "compile", "overlap_steps", "cuda_graphs")
DEFAULT_VSEG = "off:2:on,all:1:on,all:2:on,all:8:on,all:32:off,bf16_weights:2:on,liger:2:on,host_positions:2:on"


def speed_overrides(variant: str) -> list[str]:
    """`off`, `all`, one switch, or switches joined by `+` (host_positions+compile)."""
    on = set(SWITCHES) if variant == "all" else set() if variant == "off" else set(variant.split("+"))
    if not on <= set(SWITCHES):
        raise SystemExit(f"unknown variant {variant!r}: off | all | switches joined by + from {SWITCHES}")
    return [f"speed.{s}={str(s in on).lower()}" for s in SWITCHES]


def host_facts() -> dict:
    """The host's CPU as a run starts: what a host-bound step's speed moves with between calls."""
    facts: dict = {"cores": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 2)}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return facts
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    mhz = [float(line.split(":", 1)[1]) for line in lines if line.startswith("cpu MHz")]
    if models:
        facts["cpu"] = models[0]
    if mhz:
        facts["mhz_mean"], facts["mhz_min"] = round(sum(mhz) / len(mhz)), round(min(mhz))
    return facts


class GpuSampler:
    """`nvidia-smi` sampling the GPU's SM clock, power, temperature and clock-limit reasons every 0.5 s while a
    run lasts: whether a window that slowed without waiting for inputs ran on a slower (throttled) GPU.

    A summary and the series (seconds from the run's start) go into the row as `gpu`; nothing when the machine
    has no `nvidia-smi`."""

    # the limit reasons' field has two names across drivers (the older one deprecated in newer ones)
    QUERIES = (
        "clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active",
        "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active",
    )

    def __init__(self, workdir: str) -> None:
        self.log = Path(workdir) / "gpu_samples.csv"
        # nvidia-smi numbers GPUs as the driver does and ignores CUDA_VISIBLE_DEVICES: sample the one the run sees
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        self.index = visible if visible.isdigit() else "0"

    def __enter__(self) -> GpuSampler:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = None
        for query in self.QUERIES:
            cmd = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", self.index]
            try:
                if subprocess.run(cmd, capture_output=True, timeout=20).returncode != 0:
                    continue
                self.proc = subprocess.Popen(
                    [*cmd, "-lms", "500"], stdout=self.log.open("w"), stderr=subprocess.DEVNULL
                )
            except (OSError, subprocess.TimeoutExpired):
                continue
            break
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def summary(self) -> dict | None:
        if self.proc is None or not self.log.is_file():
            return None
        series = []
        for n, line in enumerate(self.log.read_text().splitlines()):
            parts = [x.strip() for x in line.split(",")]
            try:
                series.append([n * 0.5, float(parts[0]), float(parts[1]), float(parts[2]), parts[3]])
            except (ValueError, IndexError):
                continue
        if not series:
            return None
        clocks = sorted(x[1] for x in series)
        return {
            "sm_mhz_min_median_max": [clocks[0], clocks[len(clocks) // 2], clocks[-1]],
            "power_w_max": max(x[2] for x in series),
            "temp_c_max": max(x[3] for x in series),
            "limit_reasons": sorted({x[4] for x in series}),
            "series_s_mhz_w_c_reasons": series,
        }


def steps_for(batch: int, log_every: int) -> int:
    """The warm-up window (compilation, the FLOPs count) and then 5 timed windows: with 2 (micro-batch 32, until
    2026-11-29) two calls on one machine gave 91.6 and 75.8 samples/s, and one slow window moves such a median."""
    if log_every == 1:
        return 14 if batch <= 2 else (8 if batch <= 8 else 6)
    return log_every * 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sa2va_4b")
    parser.add_argument("--plain", default="1:on,2:on,8:on,32:off", help="plain configs MICRO_BATCH:CKPT ('' = none)")
    parser.add_argument("--plain-steps", type=int, default=8)
    parser.add_argument("--plain-again", action="store_true", help="run the plain configs again after vseg's")
    parser.add_argument("--vseg", default=DEFAULT_VSEG, help="vseg runs VARIANT:MICRO_BATCH:CKPT[:disk]")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--inputs", default="png", choices=["png", "synthetic"], help="as bench/train.py's --inputs")
    parser.add_argument("--timeout", type=int, default=150, help="seconds per vseg run")
    parser.add_argument(
        "--log-every",
        type=int,
        default=4,
        help="vseg steps per throughput window (trainer.log_every_n_steps; the GPU is waited for at each window's "
        "end, as in a user's run; 1: every step alone, as the plain loop times them)",
    )
    parser.add_argument("--set", default="", help="more train.py overrides for every vseg run, comma-separated")
    parser.add_argument(
        "--workdir",
        default="/tmp/vseg_bench",
        help="inputs, feature cache and runs (one per concurrent call of this script, e.g. one per GPU)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "plain_vs_vseg_train.json"))
    args = parser.parse_args()
    out = Path(args.out)
    data: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model, "rows": []}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1))

    if args.plain:
        run_plain(args, data["rows"], 1)
        save()

    for item in filter(None, args.vseg.split(",")):
        variant, batch, ckpt, *cache = item.split(":")
        if cache not in ([], ["disk"]):
            raise SystemExit(f"vseg run {item!r}: VARIANT:MICRO_BATCH:CKPT or VARIANT:MICRO_BATCH:CKPT:disk")
        disk = cache == ["disk"]
        batch = int(batch)
        run_args = argparse.Namespace(
            accum=1,
            steps=steps_for(batch, args.log_every),
            log_every=args.log_every,
            cap_gb=None,
            sam_cache="none",
            image_size=512,
            workers=args.workers,
            inputs=args.inputs,
            # counted once, for MFU, on eager runs only (a counted step is slow on the host, and FlopCounterMode
            # does not see inside compiled graphs): a compiled row takes the eager row's FLOPs per sample
            flops_step=2 if batch >= 32 and "compile" not in variant else -1,
            workdir=args.workdir,
            timeout=args.timeout,
        )
        host = host_facts()
        with GpuSampler(args.workdir) as gpu:
            row = run_one(
                run_args,
                args.model,
                "single",
                1,
                batch,
                ckpt == "on",
                speed_overrides(variant) + [o for o in args.set.split(",") if o],
                variant,
                disk,
            )
        variant += "+disk" if disk else ""  # a row name of its own in the ratios
        row.update(stack="vseg", variant=variant, host=host, host_after=host_facts(), gpu=gpu.summary())
        data["rows"].append(row)
        save()
        brief = {k: row.get(k) for k in ("variant", "micro_batch", "grad_ckpt", "status", "samples_per_s", "mfu")}
        brief.update(
            peak_gb=row.get("peak_allocated_gb"), wall_s=row.get("wall_s"), cache_fill_s=row.get("cache_fill_s")
        )
        print(json.dumps(brief), flush=True)
        if row["status"] != "ok":
            print(row.get("tail", "")[-2000:], flush=True)

    if args.plain and args.plain_again:
        run_plain(args, data["rows"], 2)
        save()

    fill_mfu(data["rows"])
    data["ratios"] = ratios(data["rows"])
    save()
    print(json.dumps(data["ratios"], indent=1), flush=True)


def run_plain(args: argparse.Namespace, rows: list[dict], pass_no: int) -> None:
    """`bench/plain_train.py` over every plain configuration, in a process of its own; its rows join `rows`."""
    plain_json = Path(args.workdir) / "plain.json"
    plain_json.parent.mkdir(parents=True, exist_ok=True)
    plain_json.unlink(missing_ok=True)  # a failed second pass must not report the first pass's rows again
    cmd = [
        sys.executable,
        "bench/plain_train.py",
        "--model-yaml",
        f"conf/model/{args.model}.yaml",
        "--configs",
        args.plain,
        "--steps",
        str(args.plain_steps),
        "--out",
        str(plain_json),
    ]
    host = host_facts()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    print(f"[plain, pass {pass_no}] {time.perf_counter() - start:.0f} s, exit {proc.returncode}", flush=True)
    after = host_facts()
    if plain_json.is_file():
        for row in json.loads(plain_json.read_text())["rows"]:
            row.update(command="python " + " ".join(cmd[1:]), plain_pass=pass_no, host=host, host_after=after)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if proc.returncode != 0:
        print((proc.stdout + proc.stderr)[-3000:], flush=True)


def fill_mfu(rows: list[dict]) -> None:
    """MFU of a compiled row from the FLOPs per sample counted on the eager row of the same shape (same model
    work: micro-batch, checkpointing, disk cache), marked `mfu_flops_from`."""

    def shape(r: dict) -> tuple:
        return r.get("micro_batch"), r.get("grad_ckpt"), r.get("disk_feature_cache"), r.get("stack")

    counted = {shape(r): r for r in rows if r.get("model_flops_per_sample") and r.get("peak_tflops_per_gpu")}
    for r in rows:
        source = counted.get(shape(r))
        if r.get("status") == "ok" and r.get("mfu") is None and source and r.get("samples_per_s"):
            flops = source["model_flops_per_sample"] * r["samples_per_s"]
            r.update(mfu=round(flops / (source["peak_tflops_per_gpu"] * 1e12), 4), mfu_flops_from=source["variant"])


def ratios(rows: list[dict]) -> dict:
    """vseg / plain per micro-batch, best / best, and each switch / off at the same micro-batch."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("samples_per_s")]
    passes: dict[int, list[float]] = {}  # the plain loop's samples/s per micro-batch, one per pass
    for r in ok:
        if r["stack"] == "plain":
            passes.setdefault(r["micro_batch"], []).append(r["samples_per_s"])
    plain = {batch: max(values) for batch, values in passes.items()}  # the faster pass: vseg's least ratio
    vseg: dict[str, dict[int, float]] = {}
    for r in ok:
        if r["stack"] == "vseg":
            vseg.setdefault(r["variant"], {})[r["micro_batch"]] = r["samples_per_s"]
    out: dict = {}
    for variant, by_batch in vseg.items():
        for batch, value in by_batch.items():
            if batch in plain:
                out[f"vseg_{variant}/plain@mb{batch}"] = round(value / plain[batch], 3)
            base = vseg.get("off", {}).get(batch)
            if variant != "off" and base:
                out[f"{variant}/off@mb{batch}"] = round(value / base, 3)
    if plain and vseg:
        best_vseg = max(v for by_batch in vseg.values() for v in by_batch.values())
        out["best_vseg/best_plain"] = round(best_vseg / max(plain.values()), 3)
    for batch, values in passes.items():
        if len(values) > 1:
            out[f"plain_spread@mb{batch}"] = round(max(values) / min(values), 3)
    return out


if __name__ == "__main__":
    main()
