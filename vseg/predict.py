"""`predict.py`'s body: any checkpoint form + any input form -> masks, overlays, metrics, on any placement.

    python predict.py ckpt=RUN_DIR                                   # the run's own validation split
    python predict.py ckpt=RUN_DIR input=scans/ output=pred/         # a folder (or image, glob, list file)
    python predict.py ckpt=RUN_DIR data=drive output=pred/           # a dataset config, with its ground truth
    python predict.py ckpt=/models/Sa2VA-4B input=x.png output=p/    # a released folder, zero-shot
    python predict.py ckpt=RUN_DIR input=scans/ devices=4            # data-parallel over 4 GPUs
    python predict.py ckpt=... input=... device_map=balanced max_memory='{0: 12GB, 1: 12GB}'   # model-parallel

The checkpoint forms are `vseg.inference.sources`, the input forms `vseg.inference.inputs`, the output
folder `vseg.inference.outputs`. The model is prepared once for inference: LoRA and trained token rows are
merged into the base (`merge_lora`), everything is cast to `dtype` (bf16 on GPUs by default) with SDPA
attention. `run` returns the summary; predict.py exits 1 when any input failed, 2 on a configuration error.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from vseg.config import ConfigError, DataConfig, ModelConfig, TrainConfig, parse_spacing
from vseg.data.workers import WorkerInit
from vseg.files import check_writable
from vseg.inference.engine import MODES, LoopTimes
from vseg.inference.inputs import DEFAULT_PROMPT, PredictItem, dataset_items, file_items
from vseg.inference.outputs import OutputStore
from vseg.inference.parallel import PLAN_ENV, predict_data_parallel, read_plan, write_batch, write_plan
from vseg.inference.placement import (
    DEVICE_MAPS,
    parse_max_memory,
    resolve_device,
)
from vseg.inference.predictor import DEFAULT_ANSWER, Predictor, inference_dtype, to_device
from vseg.inference.sources import WEIGHTS_FIX, ModelSource, apply_trainable, check_weights_file, resolve_source
from vseg.inference.targets import parse_targets, target_items
from vseg.model.build import DTYPES, build_sa2va
from vseg.model.loading import load_safetensors
from vseg.model.sa2va import Sa2VA

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ shared with export
def load_run(run_dir: Path) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """The run's typed config and trainable weights; a ConfigError says what is missing."""
    config_file, weights_file = run_dir / "config.yaml", run_dir / "weights" / "trainable.safetensors"
    for path in (config_file, weights_file):
        if not path.is_file():
            raise ConfigError(
                f"ckpt={run_dir}: {path.name} not found at {path}; pass a finished training run directory"
            )
    raw = OmegaConf.load(config_file)
    cfg: TrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), raw))  # type: ignore[assignment]
    return cfg, load_safetensors(weights_file, WEIGHTS_FIX.format(run=run_dir))


def rebuild_run(run_dir: Path) -> tuple[TrainConfig, Sa2VA, PreTrainedTokenizerBase]:
    """The run's model as training left it: base rebuilt (seeded random init, or `model.path`), trained weights in."""
    cfg, weights = load_run(run_dir)
    L.seed_everything(cfg.seed, verbose=False)  # reproduces a random-init base exactly as training built it
    model, tokenizer = build_sa2va(cfg.model, cfg.lora)
    apply_trainable(model, weights, run_dir / "weights" / "trainable.safetensors")
    return cfg, model, tokenizer


# ------------------------------------------------------------------------------------ options
@dataclass
class Options:
    """predict.yaml, checked (see conf/predict.yaml for each key's meaning)."""

    ckpt: str
    input: str | None
    split: str | None
    output: Path | None
    prompt: str | None
    answer: str
    answer_text: str | None
    max_new_tokens: int
    batch_size: int
    num_workers: int
    devices: int
    accelerator: str
    device: str
    device_map: str | None
    max_memory: dict[int | str, int | str] | None
    dtype: str
    threshold: float
    overwrite: bool
    overlays: bool
    merge_lora: bool
    limit: int | None
    writer_threads: int
    compile: bool
    targets: dict[str, str] | None = None
    pixel_spacing: tuple[float, float] | None = None


def options(pcfg: DictConfig) -> Options:
    """Reads and checks predict.yaml's keys; every problem is listed in one ConfigError."""
    g = pcfg.get
    errors: list[str] = []
    if g("out") is not None and g("output") is not None and g("out") != g("output"):
        errors.append("out= and output= both given; use output=")
    output = g("output") or g("out")
    devices = g("devices", 1)
    if devices in ("auto", -1, "-1"):
        devices = torch.cuda.device_count() or 1
    try:
        devices = int(devices)
    except (TypeError, ValueError):
        errors.append(f"devices={devices!r}: expected a number of devices (or auto)")
        devices = 1
    opts = Options(
        ckpt=str(g("ckpt")),
        input=str(g("input")) if g("input") is not None else None,
        split=g("split"),
        output=Path(output).expanduser().resolve() if output else None,
        prompt=g("prompt"),
        answer=str(g("answer", "teacher_forced")),
        answer_text=g("answer_text"),
        max_new_tokens=int(g("max_new_tokens", 32)),
        batch_size=int(g("batch_size", 8)),
        num_workers=int(g("num_workers", 2)),
        devices=devices,
        accelerator=str(g("accelerator", "auto")),
        device=str(g("device", "auto")),
        device_map=g("device_map"),
        max_memory=None,
        dtype=str(g("dtype", "auto")),
        threshold=float(g("threshold", 0.5)),
        overwrite=bool(g("overwrite", False)),
        overlays=bool(g("overlays", True)),
        merge_lora=bool(g("merge_lora", True)),
        limit=g("limit"),
        writer_threads=int(g("writer_threads", 4)),
        compile=bool(g("compile", False)),
    )
    try:
        raw = g("max_memory")
        opts.max_memory = parse_max_memory(OmegaConf.to_container(raw) if isinstance(raw, DictConfig) else raw)
    except ConfigError as err:
        errors.append(str(err))
    try:
        opts.pixel_spacing = parse_spacing(g("pixel_spacing"), "pixel_spacing")
    except ConfigError as err:
        errors.append(str(err))
    try:
        data_node = g("data")
        data = _data_override(pcfg) if isinstance(data_node, DictConfig) and "source" in data_node else None
        opts.targets = parse_targets(g("targets"), data)
    except ConfigError as err:
        errors.append(str(err))
    if opts.targets is not None and opts.prompt is not None:
        errors.append("prompt= and targets= both given: each target carries its own prompt; drop prompt=")
    if opts.answer not in MODES:
        errors.append(f"answer={opts.answer!r}: expected one of {MODES}")
    if opts.split not in (None, "val", "train", "all"):
        errors.append(f"split={opts.split!r}: expected val, train, all or null")
    if opts.device_map is not None and opts.device_map not in DEVICE_MAPS:
        errors.append(f"device_map={opts.device_map!r}: expected one of {DEVICE_MAPS} or null")
    if opts.device_map is not None and opts.devices > 1:
        errors.append("device_map (one model split over GPUs) and devices>1 (one model per GPU) exclude each other")
    if opts.compile and opts.device_map is not None:
        errors.append(
            "compile=true compiles blocks on one device; with device_map the blocks carry accelerate's "
            "device hooks: drop compile or device_map"
        )
    if opts.max_memory is not None and opts.device_map is None:
        errors.append("max_memory is only used with device_map=auto|balanced|sequential")
    if opts.dtype != "auto" and opts.dtype not in DTYPES:
        errors.append(f"dtype={opts.dtype!r}: expected auto or one of {sorted(DTYPES)}")
    if not 0.0 < opts.threshold < 1.0:
        errors.append(f"threshold={opts.threshold}: must be in (0, 1)")
    if opts.batch_size < 1 or opts.num_workers < 0 or opts.max_new_tokens < 1 or opts.devices < 1:
        errors.append("batch_size, max_new_tokens and devices must be >= 1, num_workers >= 0")
    if opts.writer_threads < 1:
        errors.append(f"writer_threads={opts.writer_threads}: must be >= 1")
    if opts.answer_text is not None and opts.answer_text.count("[SEG]") < 1:
        errors.append(f"answer_text={opts.answer_text!r}: the teacher-forced answer needs a [SEG] token")
    if opts.ckpt in ("None", "???"):
        errors.append("ckpt is required: a run directory, checkpoint, exported or released model folder, or random")
    if errors:
        raise ConfigError("invalid predict options:\n  - " + "\n  - ".join(errors))
    return opts


def _model_override(pcfg: DictConfig) -> tuple[ModelConfig | None, dict[str, Any] | None]:
    """(the `model=<preset>` as a ModelConfig, or None; every model key the command line set, or None)."""
    node = pcfg.get("model")
    if node is None or not isinstance(node, DictConfig) or not len(node):
        return None, None
    given: dict[str, Any] = OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ConfigError(f"model: unknown keys {unknown}; known: {[f.name for f in dataclasses.fields(ModelConfig)]}")
    if "name" not in node:
        return None, given
    model: ModelConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))  # type: ignore[assignment]
    return model, given


def _data_override(pcfg: DictConfig) -> DataConfig | None:
    from vseg.config import _validate_data

    node = pcfg.get("data")
    if node is None or not isinstance(node, DictConfig) or "source" not in node:
        return None
    data: DataConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), node))  # type: ignore[assignment]
    errors: list[str] = []
    _validate_data(data, lambda ok, message: errors.append(message) if not ok else None)
    if errors:
        raise ConfigError("invalid data config:\n  - " + "\n  - ".join(errors))
    return data


def resolve_items(pcfg: DictConfig, opts: Options, source: ModelSource) -> tuple[list[PredictItem], DataConfig | None]:
    """The inputs in order (and the dataset config they come from, if any)."""
    data = _data_override(pcfg)
    if data is not None and opts.input is not None:
        raise ConfigError("give either input= (files) or data= (a dataset config), not both")
    if opts.input is not None:
        items = file_items(opts.input, opts.prompt or DEFAULT_PROMPT, exclude=opts.output)
    elif data is not None:
        items = dataset_items(data, opts.split or "all", opts.prompt)
    elif source.train_cfg is not None:
        data = source.train_cfg.data
        items = dataset_items(data, opts.split or "val", opts.prompt)
    else:
        raise ConfigError(
            f"ckpt={opts.ckpt} carries no dataset of its own: pass input=IMAGE|FOLDER|GLOB|LIST or data=<source>"
        )
    if opts.targets is not None:
        with_masks = [it.mask_path for it in items if it.mask_path is not None]
        if with_masks:
            raise ConfigError(
                f"input={opts.input}: the list file gives one ground-truth mask per image (e.g. {with_masks[0]}), "
                "which cannot be split into targets=; drop the masks column, or give per-target truth with "
                "data=coco or data=polygons"
            )
        items = target_items(items)  # one item per image; every target is asked of it
    if opts.pixel_spacing is not None:
        items = [dataclasses.replace(it, spacing=opts.pixel_spacing) for it in items]
    if opts.limit is not None:
        items = items[: int(opts.limit)]
    return items, data


# ------------------------------------------------------------------------------------ model
def load_predictor(source: ModelSource, opts: Options, device: torch.device) -> Predictor:
    """The `Predictor` of `source` on `device` (or split by `opts.device_map`) with the options' answer settings."""
    return Predictor.from_source(
        source,
        device=device,
        device_map=opts.device_map,
        max_memory=opts.max_memory,
        dtype=opts.dtype,
        compile=opts.compile,
        merge_lora=opts.merge_lora,
        answer=opts.answer,
        answer_text=opts.answer_text,
        max_new_tokens=opts.max_new_tokens,
        threshold=opts.threshold,
    )


# ------------------------------------------------------------------------------------ run
def run(pcfg: DictConfig) -> dict[str, Any]:
    """Predicts every input; returns the summary written to summary.json (`{"rank": r}` on ranks > 0)."""
    begin = time.perf_counter()
    opts = options(pcfg)
    source = resolve_source(opts.ckpt, *_model_override(pcfg))
    check_weights_file(source)  # a truncated or UNSAFE weights file is refused before any output is written
    items, data = resolve_items(pcfg, opts, source)
    out = opts.output
    if out is None:
        if source.form != "run" or source.path is None:
            raise ConfigError("output= is required (only a run directory has a default: <run>/predictions)")
        out = source.path / "predictions"
    if out.is_dir() or not out.exists():  # (a file there: OutputStore.prepare's configuration error)
        check_writable(out, "prediction output (output=)")  # before the model is loaded
    parallel = opts.devices > 1
    accelerator = opts.accelerator if opts.accelerator != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    device = resolve_device(opts.device) if not parallel else torch.device("cuda" if accelerator == "gpu" else "cpu")
    if (
        opts.device_map is not None
        and not torch.cuda.is_available()
        and not (opts.max_memory or {}).keys() <= {"cpu", "disk"}
    ):
        raise ConfigError("device_map needs CUDA GPUs (none is visible); drop device_map to run on one device")
    answer_text = opts.answer_text or (source.train_cfg.data.answer if source.train_cfg else DEFAULT_ANSWER)
    fingerprint = {
        "ckpt": source.describe(),
        "answer": opts.answer,
        "answer_text": answer_text if opts.answer == "teacher_forced" else None,
        "max_new_tokens": opts.max_new_tokens if opts.answer == "generate" else None,
        "prompt": opts.prompt,
        "threshold": opts.threshold,
        "dtype": inference_dtype(opts.dtype, source, device),
    }
    if opts.targets is not None:  # (absent otherwise, so folders written before targets existed still resume)
        fingerprint["targets"] = opts.targets
    if opts.pixel_spacing is not None:
        fingerprint["pixel_spacing"] = list(opts.pixel_spacing)
    plan_file = os.environ.get(PLAN_ENV)
    child = parallel and plan_file is not None
    store = OutputStore(out, 0, opts.overlays, opts.writer_threads, opts.targets)
    if child:  # a rank launched by Lightning: the launching process fixed the plan
        todo_index = set(read_plan(Path(plan_file)))
        todo = [it for it in items if it.index in todo_index]
    else:
        OutputStore.prepare(out, fingerprint, opts.overwrite)
        done = store.done()
        todo = [it for it in items if it.id not in done]
        if done:
            log.info("resuming: %d of %d inputs already done in %s", len(items) - len(todo), len(items), out)
    load_seconds = predict_seconds = 0.0
    loop = LoopTimes()
    if todo and parallel:
        if not child:
            plan = out / "progress" / "plan.json"
            write_plan(plan, [it.index for it in todo])
            os.environ[PLAN_ENV] = str(plan)
        try:
            rank, predict_seconds = predict_data_parallel(
                load=lambda dev: load_predictor(source, opts, dev),
                items=todo,
                root=out,
                accelerator=accelerator,
                devices=opts.devices,
                batch_size=opts.batch_size,
                num_workers=opts.num_workers,
                overlays=opts.overlays,
                mode=opts.answer,
                data=data,
                writer_threads=opts.writer_threads,
                times=loop,
                targets=opts.targets,
            )
        finally:
            if not child:
                os.environ.pop(PLAN_ENV, None)
        if rank != 0:
            return {"rank": rank}
        load_seconds = time.perf_counter() - begin - predict_seconds
    elif todo:
        started = time.perf_counter()
        predictor = load_predictor(source, opts, device)
        load_seconds = time.perf_counter() - started
        dataset = predictor.dataset(todo, data, targets=opts.targets)
        loader = DataLoader(
            dataset,
            batch_size=opts.batch_size,
            num_workers=opts.num_workers,
            collate_fn=dataset.collate,
            worker_init_fn=WorkerInit(),  # workers end with this process, even after kill -9
            pin_memory=device.type == "cuda",
        )
        store.open()
        started = time.perf_counter()
        batches = iter(loader)
        try:
            with tqdm(total=len(todo), desc="predict", unit="img", dynamic_ncols=True) as bar:
                while True:
                    with loop.measure("inputs"):
                        batch = next(batches, None)
                        if batch is not None and opts.device_map is None:
                            batch = to_device(batch, device)
                    if batch is None:
                        break
                    with loop.measure("model"):
                        predictions = predictor(batch)
                    with loop.measure("writing"):
                        write_batch(store, batch, predictions, opts.answer)
                    bar.update(len(batch["items"]) + len(batch["failed"]))
        finally:
            with loop.measure("writing"):
                store.close()
        predict_seconds = time.perf_counter() - started
    total = time.perf_counter() - begin
    timing = {
        "predicted_now": len(todo),
        "skipped_done": len(items) - len(todo),
        "seconds_total": total,
        "seconds_load": load_seconds,
        "seconds_predict": predict_seconds,
        "images_per_second": len(todo) / predict_seconds if predict_seconds > 0 else None,
        "images_per_second_end_to_end": len(todo) / total if total > 0 and todo else None,
        **loop.report(),
    }
    placement = (
        f"data-parallel x{opts.devices} ({accelerator})"
        if parallel
        else f"model-parallel device_map={opts.device_map}"
        if opts.device_map
        else str(device)
    )
    extra = {
        "ckpt": source.describe(),
        "output": str(out),
        "placement": placement,
        "batch_size": opts.batch_size,
        "dtype": fingerprint["dtype"],
        "answer_mode": opts.answer,
    }
    if opts.targets is not None:
        extra["targets"] = opts.targets
    summary = store.finish(items, timing, extra)
    _report(summary, out, loop)
    return summary


def _scores_line(scores: dict[str, Any]) -> str:
    keys = ("dice", "iou", "cldice", "hd95", "assd", "hd95_mm", "assd_mm")
    return "  ".join(f"{k} {scores[k]:.4f}" for k in keys if scores.get(k) is not None)


def _report(summary: dict[str, Any], out: Path, loop: LoopTimes) -> None:
    scores = _scores_line(summary)
    for name, target in (summary.get("targets") or {}).items():
        if _scores_line(target):
            scores += f"\n  {name}: {_scores_line(target)}"
    speed = summary.get("images_per_second")
    line = f"\n{summary['ok']}/{summary['images']} masks in {out}"
    line += f"  {scores}" if scores else ""
    line += f"  ({speed:.1f} images/s)" if speed else ""
    if summary["failed"] or summary["missing"]:
        line += f"\n{summary['failed']} failed, {summary['missing']} missing: see {out / 'summary.json'}"
    split = loop.describe()
    if split:
        rank = " (rank 0)" if summary.get("placement", "").startswith("data") else ""
        line += f"\ntime in the prediction loop{rank}: {split}"
    print(line, flush=True)
