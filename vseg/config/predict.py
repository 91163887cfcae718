"""`PredictConfig`: predict.py's options, typed and checked like TrainConfig (conf/predict.yaml holds the
defaults and a comment per key; the field docs here say what each holds).

Old names still read: `out=` (now `output=`) and `answer=` for the answer mode (now `answer_mode=`: `answer`
read like a text, which `answer_text` is).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vseg.config.errors import ConfigError, one_line
from vseg.config.schema import SEG_TOKEN, TrainConfig, parse_spacing

ANSWER_MODES = ("teacher_forced", "generate")
DEVICE_MAPS = ("auto", "balanced", "sequential")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
VIDEO_MODES = ("auto", "true", "false")  # is an input a run (video, cine DICOM, stack, frame folder)?
KEY_FRAME_MODES = ("first", "uniform")
FRAMES_ON = ("cpu", "gpu")
OVERLAY_FORMATS = ("mp4", "gif")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
#: how inference resizes images: PIL's bicubic (the authors', default) | torch's antialiased bicubic on uint8
RESIZE_METHODS = ("pil", "torch")
#: keys of a composed predict.yaml that are not options: its groups, Hydra's, and the training sections a
#: model preset sets for train.py (presets are `@package _global_`)
GROUP_KEYS = ("model", "data", "hydra")


@dataclass
class PredictConfig:
    """What predict.py (and `Predictor.load`) is asked to do."""

    ckpt: str = "???"  #: run dir | .ckpt | DeepSpeed dir | export | released folder | random (with model=)
    input: str | None = None  #: image | folder | glob | list file; None: data= or the run's own data
    split: str | None = None  #: val | train | all of a dataset (None: val for the run's data, all for data=)
    output: str | None = None  #: where masks go (None: <run dir>/predictions, run directories only)
    out: str | None = None  #: old name of `output`
    prompt: str | None = None  #: the question (None: the data config's first phrasing)
    answer_mode: str = "teacher_forced"  #: teacher_forced ("It is [SEG]." forced, one pass) | generate (free text)
    answer: str | None = None  #: old name of `answer_mode`
    answer_text: str | None = None  #: the teacher-forced answer (None: the run's data.answer, "It is [SEG].")
    max_new_tokens: int = 32  #: generation budget (answer_mode=generate)
    batch_size: int = 8  #: images per forward, per process
    num_workers: int = 2  #: loader processes reading and encoding images, per process
    devices: Any = 1  #: > 1 or auto: data-parallel, one process per device
    accelerator: str = "auto"  #: data-parallel: auto | gpu | cpu
    device: str = "auto"  #: one device: auto (first GPU, else CPU) | cpu | cuda:N
    device_map: str | None = None  #: model-parallel over GPUs: auto | balanced | sequential
    max_memory: Any = None  #: with device_map: per-GPU budget, e.g. {0: 12GB, 1: 12GB}
    dtype: str = "auto"  #: auto (bfloat16 on GPUs, the checkpoint's dtype on CPU) | float32 | bfloat16 | float16
    threshold: float = 0.5  #: sigmoid threshold of the mask
    overlays: bool = True  #: also write overlays/<id>.png
    merge_lora: bool = True  #: fold adapters into the base weights before predicting
    overwrite: bool = False  #: clear earlier predictions (false: resume, skipping finished inputs)
    limit: int | None = None  #: predict only the first N inputs
    writer_threads: int = 4  #: threads encoding and writing PNGs while the model runs, per process
    compile: bool = False  #: torch.compile every repeated block (pays off on long runs)
    compile_mode: str = "default"  #: default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs
    fp8: bool = False  #: float8 matmuls in the frozen encoders and the LLM (H100/H200/Ada GPUs; needs torchao)
    resize: str = "pil"  #: pil (the authors' resize) | torch (2-3x faster CPU resize, within 1-2 grey levels)
    video: str = "auto"  #: auto: videos, cine DICOM, stacks and frame folders are runs | true | false
    key_frames: int = 5  #: frames of a run that go through the MLLM (the authors use 5)
    key_frame_mode: str = "first"  #: first | uniform: which frames are key frames
    frames_on: str = "cpu"  #: where a run's frames wait: cpu (streamed to the GPU) | gpu
    overlay_format: str = "mp4"  #: overlay video of a run: mp4 | gif
    truth: str | None = None  #: ground-truth masks of some frames (named like the frames, or <run id>/ folders)
    targets: Any = None  #: several targets per image: {name: prompt}, [name, ...] or a YAML file of either
    pixel_spacing: Any = None  #: mm per pixel ([row, col] or one number) for HD95 / ASSD in mm

    @property
    def output_dir(self) -> Path | None:
        chosen = self.output or self.out
        return Path(chosen).expanduser().resolve() if chosen else None

    def validate(self) -> None:
        """Collects every bad value and combination; raises one ConfigError listing them all."""
        errors: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                errors.append(message)

        need(self.ckpt not in ("???", "None", ""), "ckpt is required: a run directory, checkpoint, exported or "
             "released model folder, or random (with model=<preset>)")  # fmt: skip
        need(not (self.out and self.output and self.out != self.output), "out= and output= both given; use output=")
        need(
            self.answer is None or self.answer == self.answer_mode or self.answer_mode == "teacher_forced",
            "answer= (old name) and answer_mode= both given; use answer_mode=",
        )
        need(self.answer_mode in ANSWER_MODES, f"answer_mode={self.answer_mode!r}: expected one of {ANSWER_MODES}")
        need(
            self.answer in (None, *ANSWER_MODES),
            f"answer={self.answer!r}: expected one of {ANSWER_MODES} (answer= is the old name of answer_mode=)",
        )
        need(self.split in (None, "val", "train", "all"), f"split={self.split!r}: expected val, train, all or null")
        need(
            self.device_map in (None, *DEVICE_MAPS),
            f"device_map={self.device_map!r}: expected one of {DEVICE_MAPS} or null",
        )
        need(
            self.devices in ("auto", -1, "-1") or (isinstance(self.devices, int) and self.devices >= 1),
            f"devices={self.devices!r}: expected a number of devices >= 1 (or auto)",
        )
        need(
            self.device_map is None or self.devices == 1,
            "device_map (one model split over GPUs) and devices>1 (one model per GPU) exclude each other",
        )
        need(
            not (self.compile and self.device_map is not None),
            "compile=true compiles blocks on one device; with device_map the blocks carry accelerate's device "
            "hooks: drop compile or device_map",
        )
        need(
            self.max_memory is None or self.device_map is not None,
            "max_memory is only used with device_map=auto|balanced|sequential",
        )
        need(self.dtype in DTYPE_NAMES, f"dtype={self.dtype!r}: expected one of {DTYPE_NAMES}")
        need(
            self.compile_mode in COMPILE_MODES,
            f"compile_mode={self.compile_mode!r}: expected one of {COMPILE_MODES} (used with compile=true)",
        )
        need(
            not (self.fp8 and self.device_map is not None),
            "fp8=true converts the model on one GPU; drop fp8 or device_map",
        )
        need(
            not self.fp8 or self.dtype in ("auto", "bfloat16"),
            f"fp8=true starts from bfloat16 weights; dtype={self.dtype} (use dtype=auto or bfloat16)",
        )
        need(
            self.resize in RESIZE_METHODS,
            f"resize={self.resize!r}: expected one of {RESIZE_METHODS} (pil: the authors' resize; torch: faster)",
        )
        need(0.0 < self.threshold < 1.0, f"threshold={self.threshold}: must be in (0, 1)")
        need(
            self.batch_size >= 1 and self.max_new_tokens >= 1 and self.num_workers >= 0,
            "batch_size, max_new_tokens must be >= 1, num_workers >= 0",
        )
        need(self.writer_threads >= 1, f"writer_threads={self.writer_threads}: must be >= 1")
        need(
            self.targets is None or self.prompt is None,
            "prompt= and targets= both given: each target carries its own prompt; drop prompt=",
        )
        try:
            parse_spacing(self.pixel_spacing, "pixel_spacing")
        except ConfigError as err:
            errors.append(str(err))
        need(self.limit is None or self.limit >= 0, f"limit={self.limit}: must be >= 0")
        need(
            self.answer_text is None or SEG_TOKEN in self.answer_text,
            f"answer_text={self.answer_text!r}: the teacher-forced answer needs a {SEG_TOKEN} token",
        )
        need(str(self.video).lower() in VIDEO_MODES, f"video={self.video!r}: expected one of {VIDEO_MODES}")
        need(self.key_frames >= 1, f"key_frames={self.key_frames}: must be >= 1 (the authors use 5)")
        need(
            self.key_frame_mode in KEY_FRAME_MODES,
            f"key_frame_mode={self.key_frame_mode!r}: expected one of {KEY_FRAME_MODES}",
        )
        need(self.frames_on in FRAMES_ON, f"frames_on={self.frames_on!r}: expected one of {FRAMES_ON}")
        need(
            self.overlay_format in OVERLAY_FORMATS,
            f"overlay_format={self.overlay_format!r}: expected one of {OVERLAY_FORMATS}",
        )
        need(
            self.truth is None or Path(self.truth).expanduser().is_dir(),
            f"truth={self.truth}: not a folder (masks named like the frames, or <run id>/ subfolders)",
        )
        if errors:
            raise ConfigError("invalid predict options:\n  - " + "\n  - ".join(errors))


def load_predict_config(node: DictConfig | dict[str, Any]) -> PredictConfig:
    """The typed, validated PredictConfig of a composed predict.yaml (its model/data groups left aside)."""
    raw = OmegaConf.create(node) if isinstance(node, dict) else node
    known = {f.name for f in fields(PredictConfig)}
    skip = {*GROUP_KEYS, *(f.name for f in fields(TrainConfig))}
    options = {k: raw[k] for k in raw if k not in skip}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"predict: unknown keys {unknown}; known: {sorted(known)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PredictConfig), OmegaConf.create(options))
        cfg: PredictConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except Exception as err:  # noqa: BLE001 - OmegaConf's validation errors: a wrong type names the key
        key = getattr(err, "full_key", None)
        value = options.get(key) if key else None
        named = f"{key}={value!r}: " if key else ""
        raise ConfigError(f"invalid predict options: {named}{one_line(err)}") from None
    if cfg.answer in ANSWER_MODES and cfg.answer_mode == "teacher_forced":
        cfg.answer_mode = cfg.answer  # the old spelling
    cfg.video = str(cfg.video).lower()  # YAML reads true / false as booleans
    cfg.validate()
    return cfg
