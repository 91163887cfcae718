"""The plain-stack training baseline: Sa2VA-shaped training with transformers + peft only (no vseg code).

What a user would write without vseg: transformers' native `InternVLForConditionalGeneration` and
`Sam2Model` at the sizes of a vseg model preset (read from its YAML, e.g. `conf/model/sa2va_4b.yaml`),
random bf16 weights made directly on the GPU, PEFT LoRA with the vseg recipe's r / alpha / dropout /
targets (`conf/lora/default.yaml`), trainable projector, SAM-2 mask decoder, [SEG] projection and added
token rows, and an in-process loop: bf16 autocast, forward, the same three losses (sigmoid BCE + Dice on
the [SEG] mask, next-token cross-entropy on the answer tokens, weights 2.0 / 0.5 / 1.0), backward, gradient
clipping at 1.0 (as `conf/trainer/default.yaml`), fused AdamW. The batch is synthetic and already on the
GPU (no loader): ~300 tokens per sample (256 image tokens of one 448-px tile), a 1024-px SAM-2 image and a
256-px target mask.

Plain-stack choices (what transformers offers out of the box, not tuned): the LM loss is computed the
usual way, logits of every position then `model.loss_function` (vseg projects only the answer positions);
LoRA weights in float32 as PEFT makes them, cast by autocast on every use.

    python bench/plain_train.py --configs 1:on,2:on,8:on,32:off --steps 10 --out /tmp/plain.json

prints one JSON line per configuration (samples/s = median over the timed steps) and writes them to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, InternVLConfig, InternVLForConditionalGeneration, Sam2Config, Sam2Model

ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def build(model_yaml: Path, lora_yaml: Path, device: str) -> tuple[nn.Module, Sam2Model, nn.Module, dict]:
    """InternVL + SAM-2 + [SEG] projection with LoRA; returns the PEFT MLLM, SAM-2, the projection and ids."""
    spec = load_yaml(model_yaml)["model"]
    lora = load_yaml(lora_yaml)
    text = dict(spec["text"])
    model_type = text.pop("model_type")
    vocab = int(text.setdefault("vocab_size", 1000))  # the tiny preset sizes it from its tokenizer
    # Sa2VA's added tokens are the last five ids ([SEG] first); InternVL's <IMG_CONTEXT> sits before them.
    ids = {"seg": vocab - 5, "image": vocab - 7, "new": list(range(vocab - 5, vocab))}
    vision = dict(spec["vision"])
    tokens_per_tile = int((vision["image_size"][0] // vision["patch_size"][0]) ** 2 * spec["downsample_ratio"] ** 2)
    config = InternVLConfig(
        vision_config=vision,
        text_config=AutoConfig.for_model(model_type, **text, tie_word_embeddings=spec["tie_word_embeddings"]),
        image_token_id=ids["image"],
        image_seq_length=tokens_per_tile,
        downsample_ratio=spec["downsample_ratio"],
        projector_hidden_act=spec["projector_hidden_act"],
        tie_word_embeddings=spec["tie_word_embeddings"],
    )
    config._attn_implementation = spec["attn_implementation"]
    sam_config = Sam2Config(**{k: v for k, v in spec["sam2"].items() if k != "memory"})
    sam_config._attn_implementation = spec["attn_implementation"]
    ids["tokens_per_tile"] = tokens_per_tile
    ids["tile"] = vision["image_size"][0]
    ids["sam"] = int(sam_config.prompt_encoder_config.image_size)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # random weights made in bf16 directly on the GPU
    try:
        with torch.device(device):
            mllm = InternVLForConditionalGeneration(config)
            sam = Sam2Model(sam_config)
            hidden = int(text["hidden_size"])
            prompt = int(sam_config.prompt_encoder_config.hidden_size)
            fcs = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, prompt))
    finally:
        torch.set_default_dtype(default_dtype)
    mllm.requires_grad_(False)
    sam.requires_grad_(False)
    targets = "|".join(lora["target_modules"])
    peft_config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=rf"^model\.language_model\..*\.({targets})$",
        trainable_token_indices={"embed_tokens": ids["new"], "lm_head": ids["new"]},
    )
    mllm = get_peft_model(mllm, peft_config)
    for name, p in mllm.named_parameters():
        if "multi_modal_projector" in name:
            p.requires_grad_(True)
    sam.mask_decoder.requires_grad_(True)
    for module in (mllm, sam, fcs):
        for p in module.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return mllm, sam, fcs, ids


def make_batch(batch: int, ids: dict, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic samples: text, one tile of image tokens, a question and the answer "It is [SEG]." + eos."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    top = ids["image"] - 1
    prefix = torch.randint(0, top, (20,), generator=g)
    question = torch.randint(0, top, (16,), generator=g)
    answer = torch.cat([torch.randint(0, top, (3,), generator=g), torch.tensor([ids["seg"]]), torch.tensor([13])])
    image = torch.full((ids["tokens_per_tile"],), ids["image"])
    seq = torch.cat([prefix, torch.tensor([1]), image, torch.tensor([2]), question, answer])
    labels = torch.full_like(seq, IGNORE)
    labels[-answer.numel() :] = answer
    tile, sam = ids["tile"], ids["sam"]
    return {
        "input_ids": seq.repeat(batch, 1).to(device),
        "labels": labels.repeat(batch, 1).to(device),
        "attention_mask": torch.ones(batch, seq.numel(), dtype=torch.long, device=device),
        "pixel_values": torch.randn(batch, 3, tile, tile, generator=g).to(device, torch.bfloat16),
        "sam_pixel_values": torch.randn(batch, 3, sam, sam, generator=g).to(device, torch.bfloat16),
        "masks": (torch.rand(batch, sam // 4, sam // 4, generator=g) > 0.8).float().to(device),
    }


def losses(mllm: nn.Module, sam: Sam2Model, fcs: nn.Module, b: dict, ids: dict) -> torch.Tensor:
    """2.0 x BCE + 0.5 x Dice on the [SEG] masks + 1.0 x answer-token CE (means over masks and tokens)."""
    base = mllm.get_base_model()
    out = base.model(
        input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"], use_cache=False
    )
    hidden = out.last_hidden_state
    logits = base.lm_head(hidden)
    ce = base.loss_function(logits, b["labels"], vocab_size=logits.shape[-1])
    seg = b["input_ids"] == ids["seg"]
    prompts = fcs(hidden[seg])  # (N, 256), one per [SEG]
    image_index = seg.nonzero(as_tuple=True)[0]
    n = prompts.shape[0]
    embeddings = sam.get_image_embeddings(b["sam_pixel_values"])  # frozen trunk; conv_s0/s1 of the decoder train
    high_res, top = [e[image_index] for e in embeddings[:-1]], embeddings[-1][image_index]
    points = torch.zeros(n, 1, 1, 2, device=hidden.device)
    labels = -torch.ones(n, 1, 1, device=hidden.device, dtype=torch.int32)
    sparse, dense = sam.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None, input_masks=None)
    sparse = torch.cat([sparse.to(prompts.dtype), prompts[:, None, None, :]], dim=2)
    positional = sam.get_image_wide_positional_embeddings().expand(n, -1, -1, -1)
    masks, iou, _, _ = sam.mask_decoder(
        image_embeddings=top,
        image_positional_embeddings=positional,
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
        high_resolution_features=high_res,
    )
    best = iou[:, 0].argmax(dim=-1)
    mask_logits = masks[torch.arange(n, device=hidden.device), 0, best].float()
    target = b["masks"][image_index]
    bce = F.binary_cross_entropy_with_logits(mask_logits, target)
    probs = mask_logits.sigmoid().flatten(1)
    flat = target.flatten(1)
    dice = (1 - (2 * (probs * flat).sum(1) + 1) / (probs.sum(1) + flat.sum(1) + 1)).mean()
    return 2.0 * bce + 0.5 * dice + 1.0 * ce


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_config(parts: tuple, batch: int, ckpt: bool, steps: int, warmup: int, device: str) -> dict:
    mllm, sam, fcs, ids = parts
    if ckpt:
        mllm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        mllm.gradient_checkpointing_disable()
    mllm.train()
    sam.train()
    params = [p for m in (mllm, sam, fcs) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=4e-5, weight_decay=0.05, fused=device.startswith("cuda"))
    b = make_batch(batch, ids, device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, loss_values = [], []
    for step in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = losses(mllm, sam, fcs, b, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        loss_values.append(float(loss.detach()))
    opt = None
    step_s = statistics.median(times)
    return {
        "stack": "plain",
        "micro_batch": batch,
        "grad_ckpt": ckpt,
        "steps": steps,
        "s_per_step": round(step_s, 4),
        "samples_per_s": round(batch / step_s, 2),
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "seq_len": int(b["input_ids"].shape[1]),
        "first_last_loss": [round(loss_values[0], 4), round(loss_values[-1], 4)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-yaml", default=str(ROOT / "conf/model/sa2va_4b.yaml"))
    parser.add_argument("--lora-yaml", default=str(ROOT / "conf/lora/default.yaml"))
    parser.add_argument("--configs", default="1:on,2:on,8:on,32:off", help="micro-batch:grad-ckpt, comma-separated")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test with the tiny preset)"
    )
    args = parser.parse_args()
    device = args.device
    torch.manual_seed(0)
    parts = build(Path(args.model_yaml), Path(args.lora_yaml), device)
    rows = []
    for item in args.configs.split(","):
        batch, ckpt = item.split(":")
        try:
            row = run_config(parts, int(batch), ckpt == "on", args.steps, args.warmup, device)
            row["status"] = "ok"
        except torch.OutOfMemoryError:
            row = {"stack": "plain", "micro_batch": int(batch), "grad_ckpt": ckpt == "on", "status": "oom"}
            torch.cuda.empty_cache()
        name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
        row.update(model=Path(args.model_yaml).stem, device=name)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
