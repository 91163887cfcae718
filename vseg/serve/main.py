"""`vseg serve ckpt=... [placement] [host=127.0.0.1 port=8000]`: the model as an HTTP service.

The command line composes conf/serve.yaml like every vseg command; `--config FILE.yaml` reads keys from a file
first (the command line still wins). The config is validated before anything loads (one message, exit 2). The
HTTP server starts at once and the model loads in the background: /health answers 503 "starting" until
every replica is ready, then 200.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from vseg.config import ConfigError, ServeConfig, compose, load_serve_config


def _value(value: Any) -> str:
    """A YAML value as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def config_from_args(args: list[str]) -> ServeConfig:
    """`[--config FILE] key=value ...` -> a validated ServeConfig."""
    overrides: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg in ("--config", "-c") or arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1] if "=" in arg else (rest.pop(0) if rest else ""))
            if not path.is_file():
                raise ConfigError(f"--config {path}: no such file")
            node = OmegaConf.to_container(OmegaConf.load(path))
            if not isinstance(node, dict):
                raise ConfigError(f"--config {path}: expected a mapping of serve keys")
            overrides = [f"{k}={_value(v)}" for k, v in node.items()] + overrides
        elif arg.startswith("-"):
            raise ConfigError(f"unknown flag {arg}; usage: vseg serve [--config FILE.yaml] ckpt=... [key=value ...]")
        else:
            overrides.append(arg)
    return load_serve_config(compose("serve", overrides))


class Running:
    """A server on a uvicorn thread (tests, bench): `url`, `service`, `stop()`."""

    def __init__(self, cfg: ServeConfig, wait_ready: float = 300.0):
        # lazy (as in `main`): the server's parts load torch, transformers and FastAPI
        import uvicorn

        from vseg.serve.app import create_app
        from vseg.serve.jobs import JobManager
        from vseg.serve.service import Service

        self.service = Service(cfg)
        self.jobs = JobManager(cfg)
        self.app = create_app(cfg, self.service, self.jobs)
        if cfg.port == 0 or cfg.port is None:
            raise ConfigError("port must be given")
        self.url = f"http://{cfg.host}:{cfg.port}"
        config = uvicorn.Config(self.app, host=cfg.host, port=cfg.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="vseg-uvicorn", daemon=True)
        self.service.load_in_background()
        self.thread.start()
        deadline = time.time() + wait_ready
        while time.time() < deadline and not (self.server.started and self.service.state != "starting"):
            time.sleep(0.05)
        if not self.server.started:
            raise RuntimeError("the HTTP server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.service.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(overrides: list[str]) -> int:
    # lazy: `vseg serve --help` and config errors answer without torch, transformers and FastAPI; and this
    # module is imported by the package `__init__`, so prepare's spawned worker processes would load them too
    import uvicorn

    from vseg.serve.app import create_app
    from vseg.serve.jobs import JobManager
    from vseg.serve.service import Service

    if overrides and overrides[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cfg = config_from_args(overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.gil_switch_ms is not None:  # process-wide: set by the server's own process only, not by `Running`
        sys.setswitchinterval(cfg.gil_switch_ms / 1000)
    service = Service(cfg)  # placements are checked here (GPUs named but not visible: one message, exit 2)
    app = create_app(cfg, service, JobManager(cfg))
    service.load_in_background()
    print(
        f"vseg serve: {cfg.ckpt} on {len(service.replicas)} replica(s); http://{cfg.host}:{cfg.port}/ "
        f"(page), /docs (API), /health",
        file=sys.stderr,
    )
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=10)
    finally:
        service.close()
    return 0
