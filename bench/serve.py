"""`vseg serve` throughput: requests/s and p50 / p95 latency at 1, 8 and 32 concurrent clients, against
`Predictor.predict`'s images/s on the same images in the same call (the batch ceiling the server can reach).

One process: the server runs on a uvicorn thread (`vseg.serve.Running`, loopback), clients are threads
sending one 512x512 PNG per request as base64 JSON (`formats=["png"]`). Random weights with the real shapes.

    python bench/serve.py --shape sa2va_4b --device cuda:0 --clients 1 8 32 --requests 256 \
        --max-batch-size 32 --batch-timeout-ms 10 --out bench/results/serve_4b.json
    python bench/serve.py --shape tiny --device cpu --clients 1 4 --requests 24      # smoke run on a CPU
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vseg.data.synthetic import generate_vessels  # noqa: E402
from vseg.serve import Running, config_from_args, free_port  # noqa: E402


def post(url: str, body: bytes) -> float:
    start = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="sa2va_4b", help="conf/model preset (random weights)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=256, help="per client count")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout-ms", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    images = [generate_vessels(seed=i, size=args.size, style="angiogram")[0] for i in range(32)]
    bodies = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode()
        bodies.append(json.dumps({"images": [{"data": data}], "formats": ["png"]}).encode())

    port = free_port()
    cfg = config_from_args(
        [
            "ckpt=random",
            f"model={args.shape}",
            f"device={args.device}",
            f"port={port}",
            f"max_batch_size={args.max_batch_size}",
            f"batch_timeout_ms={args.batch_timeout_ms}",
            "max_concurrent=1024",
        ]
    )
    running = Running(cfg, wait_ready=1800)
    if running.service.state != "ready":
        raise SystemExit(f"model failed to load: {running.service.error}")
    predictor = running.service.replicas[0].predictor
    url = running.url + "/v1/segment"
    result: dict = {"shape": args.shape, "device": args.device, "size": args.size, "dtype": predictor.dtype,
                    "max_batch_size": args.max_batch_size, "batch_timeout_ms": args.batch_timeout_ms, "serve": {}}  # fmt: skip
    try:
        # the Predictor alone, same images, batches of max_batch_size (warm-up first)
        with running.service.replicas[0].lock:
            predictor.predict(images[:2], batch_size=2)
            start = time.perf_counter()
            rounds = max(1, 128 // len(images))
            for _ in range(rounds):
                predictor.predict(images, batch_size=args.max_batch_size)
            result["predictor_images_per_s"] = round(rounds * len(images) / (time.perf_counter() - start), 2)
        for clients in args.clients:
            n = max(args.requests, clients * 4)
            for i in range(min(clients, 8)):  # warm the HTTP path
                post(url, bodies[i % len(bodies)])
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                latencies = sorted(pool.map(lambda i: post(url, bodies[i % len(bodies)]), range(n)))
            wall = time.perf_counter() - start
            row = {
                "requests": n,
                "requests_per_s": round(n / wall, 2),
                "p50_ms": round(1000 * statistics.median(latencies), 1),
                "p95_ms": round(1000 * latencies[max(0, int(0.95 * n) - 1)], 1),
            }
            result["serve"][str(clients)] = row
            print(f"clients {clients:>3}: {row}", flush=True)
        info = running.service.info()["replicas"][0]
        result["mean_batch"] = round(info["images"] / max(1, info["batches"]), 2)
    finally:
        running.stop()
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
