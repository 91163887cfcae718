"""Where the SAM-2 Hiera-L image encoder's time goes (one GPU, 1024-px inputs, random weights).

The encoder is ~61 % of a compiled Sa2VA-4B prediction batch (BENCHMARKS.md, "Prediction"). This times it
whole and stage by stage (patch embedding, the four Hiera stages, the FPN neck), eager and with
`compile=true`'s regional compile, and times every attention shape of the trunk under each SDPA backend
and as plain (compiled) matmul + softmax, to show which parts are near the GPU's limits and which are not.

    python bench/sam_encoder.py --batch 32 --out bench/results/sam_encoder_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_encoder():
    from transformers import Sam2Config, Sam2Model

    cfg = yaml.safe_load((ROOT / "conf" / "model" / "sa2va_4b.yaml").read_text())["model"]["sam2"]
    config = Sam2Config(**cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        return Sam2Model(config).to(torch.bfloat16).eval().vision_encoder


def ms(fn, iters: int = 5, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - start) * 1e3 / iters, 2)


@torch.no_grad()
def by_stage(encoder, x: torch.Tensor) -> dict[str, float]:
    """Milliseconds per part of one forward, from CUDA events between the trunk's blocks."""
    trunk = encoder.backbone
    events: list[tuple[str, torch.cuda.Event]] = []

    def mark(name: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events.append((name, event))

    mark("start")
    h = trunk.patch_embed(x)
    h = h + trunk._get_pos_embed(h.shape[1:3])
    mark("patch_embed")
    ends, stage, levels = set(trunk.stage_ends), 1, []
    for i, block in enumerate(trunk.blocks):
        h = block(h)
        mark(f"stage{stage}")
        if i in ends:
            levels.append(h)
            stage += 1
    encoder.neck(tuple(levels))
    mark("neck")
    torch.cuda.synchronize()
    out: dict[str, float] = {}
    for (_, a), (name, b) in zip(events, events[1:], strict=False):
        out[name] = out.get(name, 0.0) + a.elapsed_time(b)
    return {k: round(v, 1) for k, v in out.items()}


def attention_shapes(trunk, batch: int, side: int) -> dict[str, tuple[int, int, int, int, int]]:
    """(sequences, heads, query length, key length, blocks) of each distinct attention in the trunk."""
    shapes: dict[str, tuple[int, int, int, int, int]] = {}
    stride0 = trunk.config.patch_stride
    tokens = side // (stride0[0] if isinstance(stride0, (list, tuple)) else stride0)
    for block in trunk.blocks:
        heads, window, stride = block.attn.num_attention_heads, block.window_size, block.query_stride
        kv = window * window if window else tokens * tokens
        seqs = batch * (tokens // window) ** 2 if window else batch
        q = kv // (stride[0] * stride[1]) if stride else kv
        name = f"{'window' if window else 'global'}{window or ''}_q{q}_kv{kv}_h{heads}"
        shapes.setdefault(name, (seqs, heads, q, kv, 0))
        s = shapes[name]
        shapes[name] = (*s[:4], s[4] + 1)
        if stride:
            tokens //= stride[0]
    return shapes


def _time_attention(q, k, v, plain) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    row: dict = {"sdpa_default_ms": ms(lambda: F.scaled_dot_product_attention(q, k, v))}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                row[f"{backend.name.lower()}_ms"] = ms(lambda: F.scaled_dot_product_attention(q, k, v))
        except RuntimeError as err:
            row[f"{backend.name.lower()}_ms"] = f"unavailable: {str(err)[:80]}"
    if k.shape[2] <= 256:  # the score matrix of a global block would not be small
        row["matmul_softmax_compiled_ms"] = ms(lambda: plain(q, k, v))
    return row


def bench_attention(shapes, head_dim: int) -> dict[str, dict]:
    def plain(q, k, v):
        scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)
        return torch.softmax(scores.float(), -1).to(q.dtype) @ v

    compiled_plain = torch.compile(plain, dynamic=False)
    rows = {}
    for name, (seqs, heads, lq, lk, blocks) in shapes.items():
        qkv = torch.randn(seqs, lk, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # the strided views transformers passes to SDPA
        rows[name] = {"blocks": blocks, **_time_attention(q[:, :, :lq], k, v, compiled_plain)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from vseg.model.compile import compile_blocks

    encoder = build_encoder()
    side = int(encoder.backbone.config.image_size[0])
    x = torch.randn(args.batch, 3, side, side, device="cuda", dtype=torch.bfloat16)
    report: dict = {"device": torch.cuda.get_device_name(0), "batch": args.batch, "image_size": side}
    with torch.no_grad():
        report["eager"] = {"ms_per_batch": ms(lambda: encoder(x)), "ms_by_part": by_stage(encoder, x)}
        print("eager", report["eager"], flush=True)
        start = time.perf_counter()
        compile_blocks(encoder)
        encoder(x)
        torch.cuda.synchronize()
        report["compiled"] = {"first_call_s": round(time.perf_counter() - start, 1)}
        report["compiled"].update(ms_per_batch=ms(lambda: encoder(x)), ms_by_part=by_stage(encoder, x))
        print("compiled", report["compiled"], flush=True)
        trunk = encoder.backbone
        head_dim = trunk.blocks[0].attn.dim_out // trunk.blocks[0].attn.num_attention_heads
        report["attention_ms_per_call"] = bench_attention(attention_shapes(trunk, args.batch, side), head_dim)
    for name, row in report["attention_ms_per_call"].items():
        print(name, row, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
