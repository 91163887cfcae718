"""Fine-tune jobs: `python train.py <overrides>` as a subprocess, its state on disk, its progress from the run.

Each job is a folder `<jobs_root>/<id>/` with `job.json` (overrides, run dir, state, exit status), `train.log`
and `run/` (the run directory). A small runner process (`python -m vseg.serve.jobs <job dir>`, a session of
its own) starts train.py, forwards SIGTERM to it and records how it ended, so the state on disk stays true when
the server restarts or dies meanwhile: a job whose runner vanished without recording an end reads
`interrupted`. Step, losses and val Dice are read from the run's TensorBoard events, never guessed.

Overrides are checked with train.py's own schema (`load_config`) before anything starts; the server picks the
run directory, and every path a job reads must lie under the server's `roots` (or `data_root`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from vseg.artifacts.files import atomic_write
from vseg.config import ConfigError, ServeConfig, compose, load_config
from vseg.data.workers import process_alive
from vseg.serve.requests import ApiError

TRAIN_PY = Path(__file__).resolve().parents[2] / "train.py"
JOB_ID = re.compile(r"[0-9a-f]{12}")
RESERVED = ("run_dir", "runs_root", "resume", "ckpt_path", "hydra", "callbacks.perf_json")
FINAL = ("done", "failed", "cancelled", "interrupted")


class JobRequest(BaseModel):
    """POST /v1/jobs."""

    overrides: list[str] = Field(default_factory=list, description="train.py overrides, e.g. trainer.max_steps=100")


def _write(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=1)), "job state")


def _alive(pid: int | None) -> bool:
    return bool(pid) and process_alive(pid)  # type: ignore[arg-type]


def progress(run_dir: Path) -> dict[str, Any]:
    """Latest step, losses and validation metrics from the run's TensorBoard events (empty before the first log)."""
    # lazy: TensorBoard's event reader pulls protobuf and its plugin tree (~0.3 s); only job status reads it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, Any] = {"step": None, "losses": {}, "val_dice": None, "checkpoints": []}
    board = run_dir / "tensorboard"
    if board.is_dir():
        acc = EventAccumulator(str(board), size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags().get("scalars", [])
        for tag in tags:
            last = acc.Scalars(tag)[-1]
            if tag != "epoch":  # Lightning logs the optimizer step as the event step
                out["step"] = max(out["step"] or 0, int(last.step))
            if tag.startswith("train/loss") or tag == "train/llm_loss":
                out["losses"][tag.removeprefix("train/")] = last.value
            elif tag in ("val/dice", "val/iou", "val/loss"):
                out[tag.replace("/", "_")] = last.value
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        out["checkpoints"] = sorted(p.name for p in checkpoints.iterdir() if p.suffix == ".ckpt")
    out["weights"] = (run_dir / "weights" / "trainable.safetensors").is_file()
    return out


class JobManager:
    """Starts, lists, reports and cancels jobs under `cfg.jobs_root`."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.root = Path(cfg.jobs_root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, job_id: str) -> Path:
        folder = self.root / job_id
        if not JOB_ID.fullmatch(job_id) or not (folder / "job.json").is_file():
            raise ApiError(404, f"no job {job_id!r}; GET /v1/jobs lists them")
        return folder

    def _roots(self) -> list[Path]:
        roots = [Path(r).expanduser().resolve() for r in self.cfg.roots]
        if self.cfg.data_root:
            roots.append(Path(self.cfg.data_root).expanduser().resolve())
        return roots

    def validate(self, overrides: list[str], run_dir: Path) -> None:
        """train.py's schema and validation, plus the server's rules on paths; raises a 4xx ApiError."""
        bad = [o for o in overrides if not isinstance(o, str) or o.lstrip("+~").split("=")[0].startswith(RESERVED)]
        if bad:
            raise ApiError(422, f"overrides {bad}: the server sets {', '.join(RESERVED)} itself; leave them out")
        try:
            cfg = load_config(compose("train", [*overrides, f"run_dir={run_dir}"]))
        except ConfigError as err:
            raise ApiError(422, f"train.py would refuse this: {err}") from None
        paths = {
            "data.root": cfg.data.root,
            "data.annotations": cfg.data.annotations,
            "data.image_root": cfg.data.image_root,
            "model.path": cfg.model.path,
            "model.tokenizer_path": cfg.model.tokenizer_path,
        }
        roots = self._roots()
        for key, value in paths.items():
            if value and not any(Path(value).expanduser().resolve().is_relative_to(r) for r in roots):
                raise ApiError(403, f"{key}={value} is outside the server's roots {[str(r) for r in roots]}")

    def submit(self, overrides: list[str]) -> dict[str, Any]:
        running = [j for j in self.list() if j["state"] in ("starting", "running")]
        if len(running) >= self.cfg.max_jobs:
            raise ApiError(409, f"{len(running)} job(s) running, max_jobs={self.cfg.max_jobs}; wait or cancel one")
        job_id = uuid.uuid4().hex[:12]
        folder = self.root / job_id
        run_dir = folder / "run"
        self.validate(overrides, run_dir)
        folder.mkdir(parents=True)
        job = {"id": job_id, "overrides": overrides, "run_dir": str(run_dir), "state": "starting",
               "created": time.time(), "runner_pid": None, "returncode": None}  # fmt: skip
        _write(folder / "job.json", job)
        # the runner imports this very vseg (a source checkout need not be the installed one)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TRAIN_PY.parent), os.environ.get("PYTHONPATH")])),
        }
        with open(folder / "train.log", "ab") as logfile:
            runner = subprocess.Popen(
                [sys.executable, "-m", "vseg.serve.jobs", str(folder)],
                stdout=logfile,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=folder,
                env=env,
                start_new_session=True,  # the job outlives a server restart; its runner records the end
            )
        (folder / "runner.pid").write_text(str(runner.pid))
        self._children = [*getattr(self, "_children", []), runner]  # reaped by poll() in status
        return self.status(job_id)

    def status(self, job_id: str) -> dict[str, Any]:
        folder = self._dir(job_id)
        for child in getattr(self, "_children", []):
            child.poll()
        job = json.loads((folder / "job.json").read_text())
        pid_file = folder / "runner.pid"
        pid = int(pid_file.read_text()) if pid_file.is_file() else None
        if job["state"] in ("starting", "running") and not _alive(pid):
            time.sleep(0.2)  # the runner may be writing its last state right now
            job = json.loads((folder / "job.json").read_text())
            if job["state"] in ("starting", "running"):
                job["state"] = "interrupted"
                job["error"] = "the job's runner ended without recording an exit (killed, or the machine restarted)"
                _write(folder / "job.json", job)
        job["cancel_requested"] = (folder / "cancel").is_file()
        job.update(progress(Path(job["run_dir"])))
        return job

    def list(self) -> list[dict[str, Any]]:
        ids = sorted(
            (p.name for p in self.root.iterdir() if JOB_ID.fullmatch(p.name)),
            key=lambda i: (self.root / i).stat().st_mtime,
        )
        out = []
        for job_id in ids:
            try:
                job = json.loads((self.root / job_id / "job.json").read_text())
            except (OSError, ValueError):
                continue
            out.append(
                {
                    "id": job_id,
                    "state": self.status(job_id)["state"] if job["state"] in ("starting", "running") else job["state"],
                }
            )
        return out

    def log(self, job_id: str, tail_bytes: int = 64_000) -> str:
        path = self._dir(job_id) / "train.log"
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - tail_bytes))
            return f.read().decode("utf-8", "replace")

    def cancel(self, job_id: str) -> dict[str, Any]:
        """SIGTERM to train.py (through the runner): it finishes the step, saves a checkpoint and exits."""
        job = self.status(job_id)
        if job["state"] not in ("starting", "running"):
            raise ApiError(409, f"job {job_id} is {job['state']}; only a running job can be cancelled")
        folder = self._dir(job_id)
        (folder / "cancel").write_text(str(time.time()))
        os.kill(int((folder / "runner.pid").read_text()), signal.SIGTERM)
        return self.status(job_id)

    def finished_run(self, job_id: str) -> Path:
        job = self.status(job_id)
        if job["state"] != "done" or not job.get("weights"):
            raise ApiError(409, f"job {job_id} is {job['state']}: only a finished (done) job's run can be served")
        return Path(job["run_dir"])

    def add_routes(self, app: Any) -> None:
        class JobRequest(BaseModel):
            overrides: list[str] = Field(
                default_factory=list, description="train.py overrides, e.g. trainer.max_steps=100"
            )

        @app.post("/v1/jobs", summary="start a fine-tune job (train.py overrides, checked first)", status_code=201)
        async def submit(body: JobRequest):
            return self.submit(body.overrides)

        @app.get("/v1/jobs", summary="every job and its state")
        async def jobs():
            return self.list()

        @app.get("/v1/jobs/{job_id}", summary="state, step, losses, val Dice, run dir")
        async def job(job_id: str):
            return self.status(job_id)

        @app.get("/v1/jobs/{job_id}/log", summary="the end of the job's log", response_class=PlainTextResponse)
        async def job_log(job_id: str):
            return PlainTextResponse(self.log(job_id))

        @app.delete("/v1/jobs/{job_id}", summary="stop: SIGTERM, a checkpoint is saved, then it exits")
        async def cancel(job_id: str):
            return self.cancel(job_id)


def _run(folder: Path) -> int:
    """The runner: train.py as a child, SIGTERM forwarded, the end written to job.json."""
    job = json.loads((folder / "job.json").read_text())
    child = subprocess.Popen(
        [sys.executable, str(TRAIN_PY), *job["overrides"], f"run_dir={job['run_dir']}"], cwd=folder
    )
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    job.update(state="running", train_pid=child.pid, started=time.time())
    _write(folder / "job.json", job)
    code = child.wait()
    cancelled = (folder / "cancel").is_file()
    state = "done" if code == 0 else "cancelled" if cancelled else "failed"
    job.update(state=state, returncode=code, ended=time.time())
    _write(folder / "job.json", job)
    return 0


if __name__ == "__main__":
    sys.exit(_run(Path(sys.argv[1])))
