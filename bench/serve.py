"""`vseg serve` against the issue's targets, every number from one call on one GPU:

1. `predict.py` images/s over a folder of 512x512 PNGs (the in-process run `bench/predict.py` times: loader
   workers, batch 32, mask and overlay PNGs written) — the throughput reference;
2. the model's batch-1 time: one pre-encoded image already on the GPU through the model (`Engine`), median;
   also `Predictor.predict` on one decoded image (encoding included) and on batches of 32, for context;
3. `vseg serve` started as its own process (the real command), clients in this process sending one PNG per
   request as base64 JSON (`formats=["png"]`), at each `--clients` level: requests/s, p50 / p95 latency, the
   mean batch the server formed and where a request's time went inside the server (prepare / queue / model);
   one server per `--prepare` mode and `--variant` (named sets of serve overrides, e.g. `gil_switch_ms=0.5`).

It prints the two ratios the targets need: requests/s at the most clients / predict.py's images/s (target
>= 0.8) and p50 at one client / the model's batch-1 time (target <= 1.2). Random weights with real shapes.

    python bench/serve.py --shape sa2va_4b --clients 1 8 32 --prepare threads processes --out bench/results/serve_4b.json
    python bench/serve.py --shape tiny --device cpu --clients 1 4 --requests 16 --predict-images 32   # CPU smoke
    python bench/serve.py --shape sa2va_4b --compile-mode reduce-overhead --clients 1 8 32   # CUDA graphs (warm-up ~2-4 min)
    python bench/serve.py --shape sa2va_4b --prepare-only 40 --predict-images 8   # one request's preparation, CPU
    python bench/serve.py --clients 1 32 --variant base: --variant gil05:gil_switch_ms=0.5   # two servers, one call
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench_predict_module():
    spec = importlib.util.spec_from_file_location("bench_predict", ROOT / "bench" / "predict.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def post(url: str, body: bytes) -> tuple[float, dict]:
    start = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        out = json.loads(resp.read())
    return time.perf_counter() - start, out


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def model_times(shape: str, device: str, folder: Path, batch: int) -> dict:
    """Batch-1 model time (pre-encoded, on the device) and the Predictor's own speeds on the same PNGs."""
    import numpy as np
    import torch

    from vseg.inference.engine import to_device
    from vseg.inference.inputs import collate, file_items
    from vseg.inference.predictor import Predictor

    predictor = Predictor.load("random", model=shape, device=device)
    sync = torch.cuda.synchronize if predictor.device.type == "cuda" else (lambda: None)
    items = file_items(str(folder), None)[:batch]
    images = [np.asarray(Image.open(it.image_path).convert("RGB")) for it in items]
    data = predictor.dataset(items)
    one = to_device(collate(predictor.processor, [data[0]]), predictor.device)

    def median_ms(engine, batch_inputs: dict, rounds: int, warm: int) -> float:
        times = []
        for i in range(rounds + warm):
            sync()
            start = time.perf_counter()
            engine(batch_inputs, probability=True)
            sync()
            if i >= warm:
                times.append(time.perf_counter() - start)
        return round(1000 * statistics.median(times), 1)

    batch1_ms = median_ms(predictor.engine(), one, 30, 5)
    # the batch closed-loop clients form at the most clients (two halves take turns): the server's forward at
    # that size, without a server around it
    half = max(1, batch // 2)
    several = to_device(collate(predictor.processor, [data[i % len(data)] for i in range(half)]), predictor.device)
    half_ms = median_ms(predictor.engine(), several, 8, 2)
    predictor.predict(images[:1])
    whole = []
    for i in range(15):
        start = time.perf_counter()
        predictor.predict(images[i % len(images) : i % len(images) + 1], probability=True)
        whole.append(time.perf_counter() - start)
    predictor.predict(images, batch_size=batch)
    start = time.perf_counter()
    rounds = 3
    for _ in range(rounds):
        predictor.predict(images, batch_size=batch)
    per_s = rounds * len(images) / (time.perf_counter() - start)
    out = {
        "model_batch1_ms": batch1_ms,
        f"model_batch{half}_ms": half_ms,
        "predictor_batch1_ms": round(1000 * statistics.median(whole), 1),  # encoding on this thread included
        "predictor_images_per_s": round(per_s, 2),  # batches of `batch`, encoding on this thread
        "dtype": predictor.dtype,
    }
    del predictor, one, several
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def prepare_times(shape: str, folder: Path, rounds: int, resize: str = "pil") -> dict:
    """One request's preparation (PNG decode + processor) on the CPU, the SAM-2 resize on the preparing thread
    ("sequential") and on a second thread beside the tiles ("concurrent", what the server does); median ms.
    `resize`: the processor's method (pil | torch, serve's `resize=`)."""
    import torch

    from vseg.artifacts.sources import preset
    from vseg.config import ServeConfig
    from vseg.model.processor import Sa2VAProcessor
    from vseg.model.random_init import build_meta
    from vseg.serve.prepare import ImageSource, prepare

    cfg = preset(shape)
    model, tokenizer = build_meta(cfg)  # parameters on the meta device: only the processor is needed
    processor = Sa2VAProcessor.for_model(model, tokenizer, cfg, 4096, resize=resize)
    raws = [p.read_bytes() for p in sorted(folder.glob("*.png"))[:8]]
    serve_cfg = ServeConfig(ckpt="random", resize=resize)
    torch.set_num_threads(1)
    out: dict = {"cpus": os.cpu_count(), "resize": resize}
    times: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    with ThreadPoolExecutor(2) as resize_pool:
        for i in range(rounds + 3):  # the two ways alternate, so a busy moment of the machine hits both alike
            for name, pool in (("sequential", None), ("concurrent", resize_pool)):
                start = time.perf_counter()
                _, sample = prepare(ImageSource("x", raw=raws[i % len(raws)]), "Please segment the blood vessels.",
                                    "It is [SEG].", serve_cfg, processor, pool)  # fmt: skip
                if i >= 3:
                    times[name].append(time.perf_counter() - start)
                out[f"{name}_sam_checksum"] = int(sample["sam_pixel_values"].sum())  # same pixels either way
    assert out["sequential_sam_checksum"] == out["concurrent_sam_checksum"]
    for name, values in times.items():
        out[f"{name}_ms"] = round(1000 * statistics.median(values), 1)
    out["load_average"] = os.getloadavg()[0]  # other work on the machine meanwhile (2 cores here: above 1 hurts)
    return out


def start_server(args: argparse.Namespace, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "vseg.cli", "serve", "ckpt=random", f"model={args.shape}", f"device={args.device}",
               f"port={port}", f"max_batch_size={args.max_batch_size}", f"batch_timeout_ms={args.batch_timeout_ms}",
               "max_concurrent=1024", *extra, *args.serve]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 900
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"vseg serve exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("vseg serve did not become ready")


def clients_level(url: str, bodies: list[bytes], clients: int, n: int) -> dict:
    replicas0 = get(url + "/v1/model")["replicas"]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(lambda i: post(url + "/v1/segment", bodies[i % len(bodies)]), range(n)))
    wall = time.perf_counter() - start
    replicas1 = get(url + "/v1/model")["replicas"]
    batches = sum(b["batches"] for b in replicas1) - sum(b["batches"] for b in replicas0)
    images = sum(b["images"] for b in replicas1) - sum(b["images"] for b in replicas0)
    latencies = sorted(t for t, _ in done)
    timings = [out["results"][0]["timings"] for _, out in done]

    def mean(key: str) -> float | None:
        values = [t[key] for t in timings if key in t]
        return round(statistics.fmean(values), 1) if values else None

    total = statistics.fmean(out["timings"]["total_ms"] for _, out in done)
    return {
        "requests": n,
        "requests_per_s": round(n / wall, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p95_ms": round(1000 * latencies[max(0, int(0.95 * n) - 1)], 1),
        "mean_batch": round(images / max(1, batches), 2),
        "server_mean_ms": {"prepare": mean("prepare_ms"), "queue": mean("queue_ms"), "model": mean("model_ms"),
                           "total": round(total, 1)},
        # the model call in parts: collating, inputs to the GPU, the forward (waited for), masks back to the host;
        # then the response's PNG encoding, and what the client saw beyond the server's total (HTTP, JSON, base64)
        "model_parts_mean_ms": {k: mean(f"{k}_ms") for k in ("collate", "copy", "forward", "finish", "encode")},
        "outside_server_mean_ms": round(1000 * statistics.fmean(t for t, _ in done) - total, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="sa2va_4b", help="conf/model preset (random weights)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=128, help="per level (at least 8 per client)")
    parser.add_argument("--predict-images", type=int, default=512, help="PNGs predict.py reads")
    parser.add_argument("--workers", type=int, default=8, help="predict.py loader workers")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout-ms", type=float, default=10.0)
    parser.add_argument(
        "--prepare",
        nargs="+",
        default=["threads"],
        choices=["threads", "processes"],
        help="a server per mode of preparing requests (vseg serve prepare=)",
    )
    parser.add_argument("--serve", nargs="*", default=[], help="more `vseg serve` key=value overrides")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="a server per variant (after --serve's overrides), e.g. base: or gil05:gil_switch_ms=0.5",
    )
    parser.add_argument("--skip-predict", action="store_true", help="leave out the predict.py run")
    parser.add_argument(
        "--predict-same-mode",
        action="store_true",
        help="predict.py runs compiled in --compile-mode too (like for like; compiling adds minutes to the call)",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        help="serve with compile=true compile_mode=... (warmed up at start-up: batch 1 and --max-batch-size)",
    )
    parser.add_argument(
        "--prepare-only",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only time one request's preparation on the CPU (decode + processor of --shape) with resize=pil and "
        "resize=torch, then exit",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.compile_mode is not None:
        args.serve = ["compile=true", f"compile_mode={args.compile_mode}", *args.serve]

    from vseg.serve import free_port

    tmp = Path(tempfile.mkdtemp(prefix="vseg_bench_serve_"))
    bench_predict = bench_predict_module()
    bench_predict.write_inputs(tmp / "in", args.predict_images)
    if args.prepare_only:
        # both resize methods, side by side (serve's resize=pil | torch)
        times = {
            method: prepare_times(args.shape, tmp / "in", args.prepare_only, method) for method in ("pil", "torch")
        }
        print(json.dumps({"shape": args.shape, "prepare": times}, indent=1))
        for name in ("sequential", "concurrent"):
            print(f"{name}: pil {times['pil'][name + '_ms']} ms, torch {times['torch'][name + '_ms']} ms")
        return
    result: dict = {"shape": args.shape, "device": args.device, "size": 512, "max_batch_size": args.max_batch_size,
                    "batch_timeout_ms": args.batch_timeout_ms, "serve_overrides": args.serve,
                    "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}  # fmt: skip
    try:
        import torch

        result["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        result["cpus"] = os.cpu_count()
    except Exception:  # noqa: BLE001 - informational only
        pass

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))

    # the model first: it also warms this process's CUDA context and kernels, so predict.py's loop below is not
    # charged for them (its first batch would otherwise take seconds)
    result.update(model_times(args.shape, args.device, tmp / "in", args.max_batch_size))
    print({k: v for k, v in result.items() if k.startswith(("model_batch", "predictor_"))}, flush=True)
    save()
    shape = {"sa2va_4b": "4b", "sa2va_1b": "1b", "sa2va_8b": "8b"}.get(args.shape, args.shape)
    if not args.skip_predict:
        bench_predict.SHAPES.setdefault(shape, args.shape)
        same = args.predict_same_mode and args.compile_mode is not None
        options = {"compile_mode": args.compile_mode} if same else {}
        row = bench_predict.bench_single(shape, args.max_batch_size, tmp / "in", args.workers, same, 8, **options)
        result["predict_py_compile_mode"] = args.compile_mode if same else None
        result["predict_py"] = {k: row[k] for k in ("images", "images_per_second", "loop_seconds", "workers")}
        print(f"predict.py: {row['images_per_second']:.1f} images/s over {row['images']} PNGs", flush=True)
        save()

    bodies = []
    for path in sorted((tmp / "in").glob("*.png"))[:32]:
        data = base64.b64encode(path.read_bytes()).decode()
        bodies.append(json.dumps({"images": [{"data": data}], "formats": ["png"]}).encode())
    most = str(max(args.clients))
    reference = result.get("predict_py", {}).get("images_per_second")
    result["serve"], summary = {}, []
    variants = [v.partition(":") for v in args.variant] or [("", "", "")]
    servers = [(p, name, [o for o in extra.split(",") if o]) for p in args.prepare for name, _, extra in variants]
    for where_mode, name, extra in servers:  # one server per preparation mode and variant, the same references
        where = where_mode + (f"+{name}" if name else "")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        server = start_server(args, port, tmp / f"serve_{where}.log", [f"prepare={where_mode}", *extra])
        rows: dict = {"start_to_ready_s": round(time.perf_counter() - started, 1)}  # loading + warm-up
        rows["warmup_seconds"] = get(url + "/v1/model").get("warmup_seconds")
        print(
            f"prepare={where}: ready after {rows['start_to_ready_s']} s, warm-up {rows['warmup_seconds']}", flush=True
        )
        result["serve"][where] = rows
        try:
            for clients in sorted({1, max(args.clients)}):  # warm-up: cuDNN / allocator at batch 1 and the largest
                clients_level(url, bodies, clients, 2 * clients)
            for clients in args.clients:
                rows[str(clients)] = row = clients_level(url, bodies, clients, max(args.requests, 8 * clients))
                print(f"prepare={where} clients {clients:>3}: {row}", flush=True)
                save()
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        if reference:
            rows["ratio_serve_vs_predict_py"] = round(rows[most]["requests_per_s"] / reference, 3)
        if "1" in rows:
            rows["ratio_p50_1_client_vs_model_batch1"] = round(rows["1"]["p50_ms"] / result["model_batch1_ms"], 3)
        summary.append(
            f"prepare={where}: {most} clients / predict.py = {rows.get('ratio_serve_vs_predict_py')} (>= 0.8); "
            f"1-client p50 / model batch-1 = {rows.get('ratio_p50_1_client_vs_model_batch1')} (<= 1.2)"
        )
        save()
    print(json.dumps(result, indent=1))
    print("targets:\n  " + "\n  ".join(summary))


if __name__ == "__main__":
    main()
