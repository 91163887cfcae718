"""`ServeConfig`: `vseg serve`'s options (conf/serve.yaml), typed and checked before any model loads."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vseg.config.errors import ConfigError, one_line
from vseg.config.predict import COMPILE_MODES, RESIZE_METHODS
from vseg.config.schema import TrainConfig

#: compile modes in which inductor records CUDA graphs (a GPU is needed)
CUDA_GRAPH_MODES = ("reduce-overhead",)


@dataclass
class ServeConfig:
    """Everything `vseg serve` needs (conf/serve.yaml); checked by `validate_serve` before any model loads."""

    ckpt: str = "???"  # what predict.py's ckpt= accepts (run dir, checkpoint, export, released folder, random)
    model: dict[str, Any] | None = None  # model=<conf/model preset> (+ model.* keys): needed with ckpt=random
    host: str = "127.0.0.1"  # loopback by default: exposing the service is a deliberate choice (host=0.0.0.0)
    port: int = 8000
    device: str = "auto"  # one replica: auto | cpu | cuda:N
    devices: Any = None  # a replica per GPU: auto | N | [0, 2]; null = one replica on `device`
    device_map: str | None = None  # one replica split over GPUs: auto | balanced | sequential
    max_memory: Any = None  # with device_map: {0: 12GB, 1: 12GB}
    dtype: str = "auto"
    compile: bool = False  # torch.compile each repeated block (compiled and warmed up at start-up)
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs; GPU only) | max-autotune-no-cudagraphs
    # batch sizes run once per replica, on its worker thread, before /health says ready (compiles, records the
    # CUDA graphs, tunes kernels); null = [1, max_batch_size] with compile=true, none without; with CUDA graphs
    # null = the powers of two up to max_batch_size, and every batch is padded to the next warmed size
    warmup_batch_sizes: list[int] | None = None
    resize: str = "pil"  # how requests' images are resized: pil (the authors') | torch (2-3x faster on the CPU)
    answer_text: str | None = None  # teacher-forced answer; null = the run's data.answer
    max_new_tokens: int = 32  # answer=generate and /v1/chat
    threshold: float = 0.5
    max_batch_size: int = 8  # images per forward pass, gathered from concurrent requests
    batch_timeout_ms: float = 10.0  # longest a worker waits for requests still being decoded to fill a batch
    workers: int = 0  # threads (or processes) decoding / encoding requests; 0 = one per core, up to 8
    prepare: str = "threads"  # where requests are decoded and encoded: threads | processes (spawned)
    # how long (ms) a thread may hold the GIL while another waits for it (`sys.setswitchinterval`; Python's own is
    # 5): the model's worker re-takes the GIL after every kernel launch, so while the preparation threads and the
    # event loop run Python code a shorter interval lets it launch sooner; null = leave Python's
    gil_switch_ms: float | None = None
    max_upload_bytes: int = 32_000_000  # per request body
    max_pixels: int = 16_777_216  # per image (4096 x 4096)
    max_images: int = 16  # per request
    max_prompt_chars: int = 1000
    max_points: int = 64  # refine clicks per request
    max_concurrent: int = 64  # requests inside the service at once; more get 429 (retry later)
    request_timeout_s: float = 300.0  # a request waiting longer for its result gets 503
    token: str | None = None  # API token (also $VSEG_SERVE_TOKEN); null = no token asked
    roots: list[str] = field(default_factory=list)  # folders whose files requests may name (images, ckpts, runs)
    data_root: str | None = None  # where the page saves corrected masks as polygons training data
    jobs_root: str = "serve_jobs"  # fine-tune jobs: state, logs and run directories
    max_jobs: int = 1  # fine-tune jobs running at once
    docs: bool = True  # /docs and /openapi.json

    def warmup_sizes(self) -> list[int]:
        """The batch sizes warmed up at start-up (see `warmup_batch_sizes`), distinct, smallest first.

        With CUDA graphs every batch is padded up to a warmed size (`pads_batches`), so the default is the powers
        of two up to `max_batch_size` (and it): padding then at most doubles a batch.
        """
        if self.warmup_batch_sizes is not None:
            return sorted(set(self.warmup_batch_sizes))
        if not self.compile:
            return []
        if self.pads_batches():
            return sorted({2**i for i in range(self.max_batch_size.bit_length())} | {self.max_batch_size})
        return sorted({1, self.max_batch_size})

    def pads_batches(self) -> bool:
        """Batches are padded to the next warmed size: a CUDA graph replays only the shapes it was recorded for,
        and recording a new batch size while serving stalls every request behind it for seconds."""
        return self.compile and self.compile_mode in CUDA_GRAPH_MODES


def load_serve_config(cfg: DictConfig | dict) -> ServeConfig:
    """Merges a composed serve config into `ServeConfig` and validates it (ConfigError lists every problem)."""
    # model presets (`model=tiny`) also set training sections (lora, optim, ...): those do not concern serving
    train_only = {f.name for f in fields(TrainConfig)} - {f.name for f in fields(ServeConfig)}
    node = OmegaConf.create(
        {k: v for k, v in OmegaConf.to_container(OmegaConf.create(cfg)).items() if k not in train_only}
    )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ServeConfig), node)
        typed: ServeConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"config key `{key}`: {one_line(err)}") from None
    validate_serve(typed)
    return typed


def validate_serve(cfg: ServeConfig) -> None:
    """Collects every impossible serve setting and raises one ConfigError listing them all."""
    errors: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    need(cfg.ckpt not in ("???", "", "None"), "ckpt is required: a run directory, checkpoint, model folder or random")
    need(cfg.ckpt != "random" or bool(cfg.model), "ckpt=random needs model=<preset> (e.g. model=tiny)")
    need(1 <= cfg.port <= 65535, f"port={cfg.port}: must be in 1..65535")
    need(cfg.dtype in ("auto", "float32", "bfloat16", "float16"), f"dtype={cfg.dtype!r}: auto|float32|bfloat16|float16")
    need(
        cfg.device_map in (None, "auto", "balanced", "sequential"),
        f"device_map={cfg.device_map!r}: auto|balanced|sequential|null",
    )
    devices = cfg.devices
    ok_devices = (
        devices is None
        or devices == "auto"
        or (isinstance(devices, int) and devices >= 1)
        or (isinstance(devices, list) and devices and all(isinstance(d, int) and d >= 0 for d in devices))
    )
    need(ok_devices, f"devices={devices!r}: auto, a count >= 1 or a list of GPU indices like [0, 2]")
    need(
        devices is None or cfg.device_map is None,
        "devices= (a replica per GPU) and device_map= (one split replica) exclude each other",
    )
    need(
        devices is None or cfg.device == "auto", "give device= (one replica) or devices= (a replica per GPU), not both"
    )
    need(
        cfg.max_memory is None or cfg.device_map is not None,
        "max_memory is only used with device_map=auto|balanced|sequential",
    )
    need(not (cfg.compile and cfg.device_map), "compile=true cannot be combined with device_map")
    need(
        cfg.compile_mode in COMPILE_MODES,
        f"compile_mode={cfg.compile_mode!r}: expected one of {COMPILE_MODES} (used with compile=true)",
    )
    need(
        not (cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES and cfg.device == "cpu" and cfg.devices is None),
        f"compile_mode={cfg.compile_mode} records CUDA graphs and needs a GPU; on device=cpu use "
        "compile_mode=default (or compile=false)",
    )
    sizes = cfg.warmup_batch_sizes
    need(
        sizes is None or all(isinstance(n, int) and 1 <= n <= cfg.max_batch_size for n in sizes),
        f"warmup_batch_sizes={sizes}: batch sizes in 1..max_batch_size={cfg.max_batch_size} (or [] for none)",
    )
    need(
        not (cfg.pads_batches() and sizes and cfg.max_batch_size not in sizes),
        f"warmup_batch_sizes={sizes}: with compile_mode={cfg.compile_mode} every batch is padded to a warmed size, "
        f"so the list must include max_batch_size={cfg.max_batch_size} (or lower max_batch_size)",
    )
    need(
        cfg.resize in RESIZE_METHODS,
        f"resize={cfg.resize!r}: expected one of {RESIZE_METHODS} (pil: the authors' resize; torch: faster)",
    )
    need(0.0 < cfg.threshold < 1.0, f"threshold={cfg.threshold}: must be in (0, 1)")
    need(cfg.answer_text is None or "[SEG]" in cfg.answer_text, f"answer_text={cfg.answer_text!r}: needs a [SEG] token")
    for key in ("max_new_tokens", "max_batch_size", "max_upload_bytes", "max_pixels", "max_images", "max_prompt_chars",
                "max_points", "max_concurrent", "max_jobs"):  # fmt: skip
        need(getattr(cfg, key) >= 1, f"{key}={getattr(cfg, key)}: must be >= 1")
    need(cfg.prepare in ("threads", "processes"), f"prepare={cfg.prepare!r}: expected threads or processes")
    need(cfg.workers >= 0, f"workers={cfg.workers}: must be >= 0 (0 = one per CPU core, up to 8)")
    need(
        cfg.gil_switch_ms is None or 0.01 <= cfg.gil_switch_ms <= 100,
        f"gil_switch_ms={cfg.gil_switch_ms}: must be in [0.01, 100] ms (or null for Python's 5 ms)",
    )
    need(cfg.batch_timeout_ms >= 0, f"batch_timeout_ms={cfg.batch_timeout_ms}: must be >= 0")
    need(cfg.request_timeout_s > 0, f"request_timeout_s={cfg.request_timeout_s}: must be > 0")
    for root in cfg.roots:
        need(Path(root).expanduser().is_dir(), f"roots: {root} is not a directory")
    if cfg.data_root is not None:
        need(Path(cfg.data_root).expanduser().is_dir(), f"data_root={cfg.data_root}: not a directory (create it first)")
    need(
        cfg.host in ("127.0.0.1", "localhost", "::1")
        or bool(cfg.token or __import__("os").environ.get("VSEG_SERVE_TOKEN")),
        f"host={cfg.host} exposes the service beyond this machine: set token=... (or $VSEG_SERVE_TOKEN) as well",
    )
    if errors:
        raise ConfigError("invalid serve configuration:\n  - " + "\n  - ".join(errors))
