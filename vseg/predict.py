"""`predict.py`'s body: any checkpoint form + any input form -> masks, overlays, metrics, on any placement.

    python predict.py ckpt=RUN_DIR                                   # the run's own validation split
    python predict.py ckpt=RUN_DIR input=scans/ output=pred/         # a folder (or image, glob, list file)
    python predict.py ckpt=RUN_DIR data=drive output=pred/           # a dataset config, with its ground truth
    python predict.py ckpt=/models/Sa2VA-4B input=x.png output=p/    # a released folder, zero-shot
    python predict.py ckpt=RUN_DIR input=scans/ devices=4            # data-parallel over 4 GPUs
    python predict.py ckpt=... input=... device_map=balanced max_memory='{0: 12GB, 1: 12GB}'   # model-parallel

The checkpoint forms are `vseg.artifacts.sources`, the input forms `vseg.inference.inputs`, the output
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

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from vseg.artifacts.files import check_writable
from vseg.artifacts.sources import ModelSource, check_weights_file, resolve_source
from vseg.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    PredictConfig,
    load_predict_config,
    parse_spacing,
    validate_data,
)
from vseg.data.workers import WorkerInit
from vseg.inference.engine import LoopTimes
from vseg.inference.feed import chunk_size, device_batches
from vseg.inference.inputs import DEFAULT_PROMPT, PredictItem, dataset_items, file_items
from vseg.inference.outputs import OutputStore, outcome_lines
from vseg.inference.parallel import PLAN_ENV, predict_data_parallel, read_plan, write_batch, write_plan
from vseg.inference.placement import (
    parse_max_memory,
    resolve_device,
)
from vseg.inference.predictor import DEFAULT_ANSWER, Predictor, inference_dtype
from vseg.inference.run_outputs import run_inputs
from vseg.inference.runs import predict_run_inputs
from vseg.inference.targets import parse_targets, target_items

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ options
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
    node = pcfg.get("data")
    if node is None or not isinstance(node, DictConfig) or "source" not in node:
        return None
    data: DataConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), node))  # type: ignore[assignment]
    errors: list[str] = []
    validate_data(data, lambda ok, message: errors.append(message) if not ok else None)
    if errors:
        raise ConfigError("invalid data config:\n  - " + "\n  - ".join(errors))
    return data


def resolve_items(
    data: DataConfig | None, opts: PredictConfig, source: ModelSource
) -> tuple[list[PredictItem], DataConfig | None]:
    """The inputs in order (and the dataset config they come from, if any); `data`: the command line's data=."""
    if data is not None and opts.input is not None:
        raise ConfigError("give either input= (files) or data= (a dataset config), not both")
    if opts.input is not None:
        items = file_items(opts.input, opts.prompt or DEFAULT_PROMPT, exclude=opts.output_dir)
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
        # the user's pixel size wins over data.pixel_spacing and over DICOM files' own (vseg.inference.inputs)
        items = [dataclasses.replace(it, spacing=opts.pixel_spacing, spacing_from="pixel_spacing=") for it in items]
    if opts.limit is not None:
        items = items[: int(opts.limit)]
    return items, data


# ------------------------------------------------------------------------------------ model
def load_predictor(
    source: ModelSource, opts: PredictConfig, device: torch.device, max_memory: dict[int | str, int | str] | None = None
) -> Predictor:
    """The `Predictor` of `source` on `device` (or split by `opts.device_map`) with the options' answer settings."""
    return Predictor.from_source(
        source,
        device=device,
        device_map=opts.device_map,
        max_memory=max_memory,
        dtype=opts.dtype,
        compile=opts.compile,
        compile_mode=opts.compile_mode,
        fp8=opts.fp8,
        merge_lora=opts.merge_lora,
        resize=opts.resize,
        answer=opts.answer_mode,
        answer_text=opts.answer_text,
        max_new_tokens=opts.max_new_tokens,
        threshold=opts.threshold,
    )


# ------------------------------------------------------------------------------------ run
def run(pcfg: DictConfig) -> dict[str, Any]:
    """Predicts every input; returns the summary written to summary.json (`{"rank": r}` on ranks > 0)."""
    begin = time.perf_counter()
    data_given = _data_override(pcfg)
    opts = _options(pcfg, data_given)
    source = resolve_source(opts.ckpt, *_model_override(pcfg))
    check_weights_file(source)  # a truncated or UNSAFE weights file is refused before any output is written
    runs = run_inputs(opts.input, opts.video, exclude=opts.output_dir) if opts.input is not None else None
    if runs is not None:  # video, cine DICOM, stacks, frame folders: vseg.inference.run_outputs
        place = Placement.of(opts)
        return predict_run_inputs(
            opts, source, runs, lambda dev: load_predictor(source, opts, dev, place.max_memory), place
        )
    items, data = resolve_items(data_given, opts, source)
    out = _output_dir(opts, source)
    place = Placement.of(opts)
    store, todo = _plan(items, out, opts, source, place)
    if place.parallel and len(todo) < place.devices:  # no rank without an input (Lightning refuses empty loaders)
        place = dataclasses.replace(place, devices=max(1, len(todo)))
    loop = LoopTimes()
    load_seconds = predict_seconds = 0.0
    if todo and place.parallel:
        rank, predict_seconds = _predict_data_parallel(todo, data, out, opts, source, place, loop)
        if rank != 0:
            return {"rank": rank}
        load_seconds = time.perf_counter() - begin - predict_seconds
    elif todo:
        load_seconds, predict_seconds = _predict_one_device(todo, data, store, opts, source, place, loop)
    timing = _timing(len(items), len(todo), time.perf_counter() - begin, load_seconds, predict_seconds, loop)
    summary = store.finish(items, timing, _extra(opts, source, out, place))
    _report(summary, out, loop)
    return summary


def _options(pcfg: DictConfig, data: DataConfig | None) -> PredictConfig:
    """The typed options with targets= and pixel_spacing= in their parsed forms (name -> prompt; (row, col) mm)."""
    opts = load_predict_config(pcfg)
    return dataclasses.replace(
        opts,
        targets=parse_targets(opts.targets, data),
        pixel_spacing=parse_spacing(opts.pixel_spacing, "pixel_spacing"),
    )


def _output_dir(opts: PredictConfig, source: ModelSource) -> Path:
    """`output=`, or `<run>/predictions` for a run directory; checked writable before the model is loaded."""
    out = opts.output_dir
    if out is None:
        if source.form != "run" or source.path is None:
            raise ConfigError("output= is required (only a run directory has a default: <run>/predictions)")
        out = source.path / "predictions"
    if out.is_dir() or not out.exists():  # (a file there: OutputStore.prepare's configuration error)
        check_writable(out, "prediction output (output=)")
    return out


@dataclass(frozen=True)
class Placement:
    """Where the model runs: one device, `devices` data-parallel processes, or split by a device map."""

    devices: int
    accelerator: str
    device: torch.device
    device_map: str | None
    max_memory: dict[int | str, int | str] | None

    @classmethod
    def of(cls, opts: PredictConfig) -> Placement:
        devices = (torch.cuda.device_count() or 1) if opts.devices in ("auto", -1, "-1") else int(opts.devices)
        max_memory = parse_max_memory(opts.max_memory)  # checked here: it names the GPUs of this machine
        cuda = torch.cuda.is_available()
        accelerator = opts.accelerator if opts.accelerator != "auto" else ("gpu" if cuda else "cpu")
        # Data-parallel ranks get their own GPU from Lightning; here only the kind matters.
        parallel_device = torch.device("cuda" if accelerator == "gpu" else "cpu")
        device = parallel_device if devices > 1 else resolve_device(opts.device)
        if opts.device_map is not None and not cuda and not (max_memory or {}).keys() <= {"cpu", "disk"}:
            raise ConfigError("device_map needs CUDA GPUs (none is visible); drop device_map to run on one device")
        return cls(devices, accelerator, device, opts.device_map, max_memory)

    @property
    def parallel(self) -> bool:
        return self.devices > 1

    def describe(self) -> str:
        if self.parallel:
            return f"data-parallel x{self.devices} ({self.accelerator})"
        return f"model-parallel device_map={self.device_map}" if self.device_map else str(self.device)


def _plan(
    items: list[PredictItem], out: Path, opts: PredictConfig, source: ModelSource, place: Placement
) -> tuple[OutputStore, list[PredictItem]]:
    """The output store and the inputs still to predict: a new or resumed folder (whose fingerprint must match
    these options), or, on a data-parallel rank, the plan the launching process fixed."""
    store = OutputStore(out, 0, opts.overlays, opts.writer_threads, opts.targets)
    plan_file = os.environ.get(PLAN_ENV)
    if place.parallel and plan_file is not None:  # a rank launched by Lightning
        todo_index = set(read_plan(Path(plan_file)))
        return store, [it for it in items if it.index in todo_index]
    OutputStore.prepare(out, _fingerprint(opts, source, place), opts.overwrite)
    done = store.done()
    todo = [it for it in items if it.id not in done]
    if done:
        log.info("resuming: %d of %d inputs already done in %s", len(items) - len(todo), len(items), out)
    return store, todo


def _fingerprint(opts: PredictConfig, source: ModelSource, place: Placement) -> dict[str, Any]:
    """What a resumed output folder must have been written with."""
    answer_text = opts.answer_text or (source.train_cfg.data.answer if source.train_cfg else DEFAULT_ANSWER)
    fingerprint = {
        "ckpt": source.describe(),
        "answer": opts.answer_mode,
        "answer_text": answer_text if opts.answer_mode == "teacher_forced" else None,
        "max_new_tokens": opts.max_new_tokens if opts.answer_mode == "generate" else None,
        "prompt": opts.prompt,
        "threshold": opts.threshold,
        "dtype": inference_dtype(opts.dtype, source, place.device),
    }
    if opts.targets is not None:  # (absent otherwise, so folders written before targets existed still resume)
        fingerprint["targets"] = opts.targets
    if opts.pixel_spacing is not None:
        fingerprint["pixel_spacing"] = list(opts.pixel_spacing)
    return fingerprint


def _predict_data_parallel(
    todo: list[PredictItem],
    data: DataConfig | None,
    out: Path,
    opts: PredictConfig,
    source: ModelSource,
    place: Placement,
    loop: LoopTimes,
) -> tuple[int, float]:
    """One process per device on Lightning (vseg.inference.parallel); returns (rank, predict seconds)."""
    child = os.environ.get(PLAN_ENV) is not None
    if not child:  # the launching process fixes the plan every rank shards
        plan = out / "progress" / "plan.json"
        write_plan(plan, [it.index for it in todo])
        os.environ[PLAN_ENV] = str(plan)
    try:
        return predict_data_parallel(
            load=lambda dev: load_predictor(source, opts, dev, place.max_memory),
            items=todo,
            root=out,
            accelerator=place.accelerator,
            devices=place.devices,
            batch_size=opts.batch_size,
            num_workers=opts.num_workers,
            overlays=opts.overlays,
            mode=opts.answer_mode,
            data=data,
            writer_threads=opts.writer_threads,
            times=loop,
            targets=opts.targets,
        )
    finally:
        if not child:
            os.environ.pop(PLAN_ENV, None)


def _predict_one_device(
    todo: list[PredictItem],
    data: DataConfig | None,
    store: OutputStore,
    opts: PredictConfig,
    source: ModelSource,
    place: Placement,
    loop: LoopTimes,
) -> tuple[float, float]:
    """The loop on one device (or one split model): loader workers read and encode, the model runs, writer
    threads encode PNGs. Returns (load seconds, predict seconds)."""
    started = time.perf_counter()
    predictor = load_predictor(source, opts, place.device, place.max_memory)
    load_seconds = time.perf_counter() - started
    dataset = predictor.dataset(todo, data, targets=opts.targets)
    # Workers build chunks of a batch (all of them on the first batch at once); the chunks are merged on the
    # device (vseg.inference.feed). Targets batches are built whole (their collate pairs images and targets).
    chunk = opts.batch_size if opts.targets else chunk_size(opts.batch_size, opts.num_workers)
    loader = DataLoader(
        dataset,
        batch_size=chunk,
        num_workers=opts.num_workers,
        collate_fn=dataset.collate,
        worker_init_fn=WorkerInit(),  # workers end with this process, even after kill -9
        pin_memory=place.device.type == "cuda",
        prefetch_factor=max(2, 2 * opts.batch_size // (chunk * max(1, opts.num_workers))) if opts.num_workers else None,
    )
    store.open()
    started = time.perf_counter()
    device = place.device if place.device_map is None else None
    batches = device_batches(loader, opts.batch_size, device, predictor.tokenizer.pad_token_id)
    try:
        with tqdm(total=len(todo), desc="predict", unit="img", dynamic_ncols=True) as bar:
            while True:
                with loop.measure("inputs"):
                    batch = next(batches, None)
                if batch is None:
                    break
                with loop.measure("model"):
                    predictions = predictor(batch)
                with loop.measure("writing"):
                    write_batch(store, batch, predictions, opts.answer_mode)
                bar.update(len(batch["items"]) + len(batch["failed"]))
    finally:
        with loop.measure("writing"):
            store.close()
    return load_seconds, time.perf_counter() - started


def _timing(
    n_items: int, n_todo: int, total: float, load_seconds: float, predict_seconds: float, loop: LoopTimes
) -> dict[str, Any]:
    return {
        "predicted_now": n_todo,
        "skipped_done": n_items - n_todo,
        "seconds_total": total,
        "seconds_load": load_seconds,
        "seconds_predict": predict_seconds,
        "images_per_second": n_todo / predict_seconds if predict_seconds > 0 else None,
        "images_per_second_end_to_end": n_todo / total if total > 0 and n_todo else None,
        **loop.report(),
    }


def _extra(opts: PredictConfig, source: ModelSource, out: Path, place: Placement) -> dict[str, Any]:
    """The run's settings recorded in summary.json."""
    extra = {
        "ckpt": source.describe(),
        "output": str(out),
        "placement": place.describe(),
        "batch_size": opts.batch_size,
        "dtype": inference_dtype(opts.dtype, source, place.device),
        "answer_mode": opts.answer_mode,
    }
    if opts.targets is not None:
        extra["targets"] = opts.targets
    return extra


def _report(summary: dict[str, Any], out: Path, loop: LoopTimes) -> None:
    done = f"{summary['ok']}/{summary['images']} masks"
    line = outcome_lines(summary, out, done, summary.get("images_per_second"), "images")
    split = loop.describe()
    if split:
        rank = " (rank 0)" if summary.get("placement", "").startswith("data") else ""
        line += f"\ntime in the prediction loop{rank}: {split}"
    line += f"\nper input: {out / 'results.jsonl'}\nsummary:   {out / 'summary.json'}"
    print(line, flush=True)
