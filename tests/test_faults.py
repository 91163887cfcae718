"""Runs that survive (issue 8): atomic checkpoints, exact resume, signals, kill -9, NaN steps, failing ranks.

Faults are injected for real: subprocesses running `train.py` are sent SIGTERM or SIGKILL, NaNs come
from the test-only VSEG_TEST_* hooks (vseg/training/faults/injection.py), a rank raises in a 2-process gloo run. Resumed
runs are compared with an uninterrupted run of the same seed through the per-micro-batch trace
(VSEG_TEST_TRACE: step, sample ids, loss): the same samples in the same order, and the same losses up
to CPU float noise (usually bit-identical; see `assert_continues`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vseg.artifacts.checkpoints import COMPLETE_MARKER, complete_checkpoints, newest_checkpoint, rotate_checkpoints
from vseg.training.faults import NonFiniteError
from vseg.training.run import run

from conftest import ROOT, tiny_cfg

# 8 synthetic images -> 7 train, batch 2 -> 4 batches per epoch: 8 steps cross two epoch boundaries.
FAST = [
    "trainer.val_check_interval=null",
    "trainer.check_val_every_n_epoch=100",
    "trainer.log_every_n_steps=1",
    "lora.dropout=0.1",  # dropout on: resumed runs must also restore the RNG state
]
CLI = [
    "data.num_samples=8",
    "data.batch_size=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.num_sanity_val_steps=0",
    *FAST,
]


def read_trace(path: Path) -> dict[tuple[int, int, int], tuple[list[str], float]]:
    """(step, rank, position in step) -> (sample ids, loss); a step run twice (lost work) keeps its last run."""
    runs: dict[tuple[int, int], list[list[tuple[list[str], float]]]] = {}
    last_step: dict[int, int] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        key = (row["step"], row["rank"])
        if last_step.get(row["rank"]) != row["step"] or key not in runs:
            runs.setdefault(key, []).append([])  # a new pass over this step (first, or after a resume)
        last_step[row["rank"]] = row["step"]
        runs[key][-1].append((row["ids"], row["loss"]))
    out = {}
    for (step, rank), passes in runs.items():
        for i, item in enumerate(passes[-1]):
            out[(step, rank, i)] = item
    return out


def assert_continues(got: dict, reference: dict) -> None:
    """Same steps, same samples in the same order, and the same losses up to CPU float noise.

    Mostly bit-identical; but the uninterrupted run itself was seen to vary in the 7th digit between
    repeated runs on a busy 2-core machine, so losses are compared with a relative tolerance of 1e-5.
    """
    assert sorted(got) == sorted(reference)
    assert [got[k][0] for k in sorted(got)] == [reference[k][0] for k in sorted(reference)]  # sample ids
    losses = torch.tensor([got[k][1] for k in sorted(got)], dtype=torch.float64)
    expected = torch.tensor([reference[k][1] for k in sorted(reference)], dtype=torch.float64)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=0.0)


def steps_in(path: Path) -> int:
    """Highest step seen in a trace file so far (-1 when empty)."""
    if not path.exists():
        return -1
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return max((row["step"] for row in lines), default=-1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted 8-step run (dropout on, two epoch boundaries): the trace every resume must match."""
    tmp = tmp_path_factory.mktemp("reference")
    trace = tmp / "trace.jsonl"
    old = os.environ.get("VSEG_TEST_TRACE")
    os.environ["VSEG_TEST_TRACE"] = str(trace)
    try:
        run(tiny_cfg([f"run_dir={tmp / 'run'}", "trainer.max_steps=8", "checkpoint.every_n_steps=100", *FAST]))
    finally:
        os.environ.pop("VSEG_TEST_TRACE") if old is None else os.environ.__setitem__("VSEG_TEST_TRACE", old)
    out = read_trace(trace)
    assert len({k[0] for k in out}) == 8
    return out


# ---------------------------------------------------------------------------------------------- unit
def _fake_ckpt(path: Path, step: int) -> None:
    torch.save({"global_step": step, "state_dict": {"w": torch.ones(4)}}, path)


def test_only_complete_checkpoints_are_candidates_and_rotation_keeps_the_good_one(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    _fake_ckpt(d / "step0000002.ckpt", 2)
    _fake_ckpt(d / "step0000004.ckpt", 4)
    _fake_ckpt(d / "last.ckpt", 4)
    # a write killed half way under the temporary name, and a torn file under a final name (old code)
    _fake_ckpt(d / "step0000006.ckpt.tmp", 6)
    data = (d / "step0000004.ckpt").read_bytes()
    (d / "step0000008.ckpt").write_bytes(data[: len(data) // 2])
    # DeepSpeed-style directories: one without its completion marker, one with it
    (d / "step0000010.ckpt").mkdir()
    (d / "step0000010.ckpt" / "latest").write_text("checkpoint")
    (d / "step0000003.ckpt").mkdir()
    (d / "step0000003.ckpt" / COMPLETE_MARKER).write_text(json.dumps({"global_step": 3}))

    found = complete_checkpoints(d)
    assert [(s, p.name) for s, p in found] == [
        (2, "step0000002.ckpt"),
        (3, "step0000003.ckpt"),
        (4, "step0000004.ckpt"),
        (4, "last.ckpt"),
    ] or [(s, p.name) for s, p in found][-2:] == [(4, "last.ckpt"), (4, "step0000004.ckpt")]
    assert newest_checkpoint(d).name in ("step0000004.ckpt", "last.ckpt")

    deleted = rotate_checkpoints(d, keep=1)
    assert sorted(p.name for p in deleted) == ["step0000002.ckpt", "step0000003.ckpt"]
    assert (d / "step0000004.ckpt").is_file()  # the only good step checkpoint survives
    assert (d / "step0000008.ckpt").is_file() and (d / "step0000010.ckpt").is_dir()  # never picked, not deleted
    # Only torn checkpoints left besides one good one: keep=1 never deletes it.
    assert rotate_checkpoints(d, keep=1) == []
    assert newest_checkpoint(d) is not None


def test_windowed_loader_resumes_mid_epoch_in_the_same_order():
    from torch.utils.data import DataLoader

    from vseg.data.datamodule import WindowedLoader, _EpochSeededSampler, _ResumableSampler

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"i": torch.tensor(i), "labels": torch.zeros(3, dtype=torch.long)}

    def loader():
        data = Items()
        dl = DataLoader(data, batch_size=2, sampler=_ResumableSampler(_EpochSeededSampler(data, seed=3)))
        return WindowedLoader(dl, accumulate=2)

    full = loader()
    epochs = [[b["i"].tolist() for b in full] for _ in range(3)]
    assert epochs[0] != epochs[1]  # reshuffled per epoch

    resumed = loader()
    resumed.load_state_dict({"epoch": 1, "batches": 2})  # 2 of epoch 1's 5 batches were trained on
    assert [b["i"].tolist() for b in resumed] == epochs[1][2:]
    assert [b["i"].tolist() for b in resumed] == epochs[2]

    at_end = loader()
    at_end.load_state_dict({"epoch": 1, "batches": 5})  # saved on epoch 1's last batch
    assert [b["i"].tolist() for b in at_end] == epochs[2]


# ---------------------------------------------------------------------------------------------- resume
def test_signals_stop_mid_epoch_and_at_epoch_end_and_resume_matches_the_uninterrupted_run(
    tmp_path, monkeypatch, reference
):
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("VSEG_TEST_TRACE", str(trace))
    run_dir = tmp_path / "run"
    cfg = [f"run_dir={run_dir}", "trainer.max_steps=8", "checkpoint.every_n_steps=100", *FAST]
    # The process signals itself during step 1: the step finishes, step0000002.ckpt (mid-epoch) is saved.
    monkeypatch.setenv("VSEG_TEST_SIGNAL_AT", "1:SIGTERM")
    first = run(tiny_cfg(cfg))
    assert (first.stopped_by, first.global_step, first.exit_code) == ("SIGTERM", 2, 128 + signal.SIGTERM)
    assert first.resumed_from is None and not (run_dir / "weights").exists()
    # The same command continues; SIGUSR1 (SLURM pre-emption) during step 3 saves at the epoch's end.
    monkeypatch.setenv("VSEG_TEST_SIGNAL_AT", "3:SIGUSR1")
    second = run(tiny_cfg(cfg))
    assert second.resumed_from == (run_dir / "checkpoints" / "step0000002.ckpt").resolve()
    assert (second.stopped_by, second.global_step) == ("SIGUSR1", 4)
    monkeypatch.delenv("VSEG_TEST_SIGNAL_AT")
    third = run(tiny_cfg(cfg))
    assert third.resumed_from.name == "step0000004.ckpt" and third.global_step == 8 and third.stopped_by is None
    assert_continues(read_trace(trace), reference)  # same samples, same order, same losses


# ---------------------------------------------------------------------------------------------- bad numbers
@pytest.mark.parametrize(
    ("precision", "overlap"), [("32-true", True), ("bf16-mixed", True), ("bf16-mixed", False)], ids=str
)
def test_injected_nan_steps_are_skipped_counted_and_named(tmp_path, monkeypatch, caplog, precision, overlap):
    # Accumulation 2: a NaN in one micro-batch (step 1, micro-batch 1) must skip the whole step; step 2 gets
    # a NaN gradient with a finite loss. speed.overlap_steps: fused AdamW skips on the device and the guard
    # reports a step later; without it the guard reads the flags on the host and skips the call.
    monkeypatch.setenv("VSEG_TEST_NAN_LOSS_STEPS", "1:1")
    monkeypatch.setenv("VSEG_TEST_NAN_GRAD_STEPS", "2")
    cfg = tiny_cfg(
        [
            f"run_dir={tmp_path}",
            "trainer.max_steps=4",
            "trainer.accumulate_grad_batches=2",
            f"trainer.precision={precision}",  # bf16 autocast (on CPU here; the GPU recipe's precision)
            f"speed.overlap_steps={str(overlap).lower()}",
            "checkpoint.every_n_steps=1",
            "data.num_samples=16",
            *FAST,
        ]
    )
    with caplog.at_level("WARNING", logger="vseg.training.faults"):
        result = run(cfg)
    assert result.global_step == 4
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    adam_steps = {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert adam_steps == {2.0}  # 4 optimizer steps, 2 skipped: AdamW updated its state only twice
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    messages = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(messages) == 2
    assert "step 1: non-finite loss in samples [" in messages[0] and "1 in a row" in messages[0]
    assert "step 2: non-finite gradient" in messages[1] and "2 in a row, 2 in total" in messages[1]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert max(e.value for e in events.Scalars("train/bad_steps")) == 2


def test_too_many_bad_steps_in_a_row_stop_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VSEG_TEST_NAN_LOSS_STEPS", "1,2,3")
    cfg = tiny_cfg([f"run_dir={tmp_path}", "trainer.max_steps=6", "faults.max_bad_steps=3", *FAST])
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss in 3 optimizer steps in a row .*samples"):
        run(cfg)


def test_no_checkpoint_is_written_from_nan_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("VSEG_TEST_NAN_WEIGHTS_STEP", "1")  # weights turn NaN during optimizer step 1
    cfg = tiny_cfg([f"run_dir={tmp_path}", "trainer.max_steps=4", "checkpoint.every_n_steps=1", *FAST])
    with pytest.raises(NonFiniteError, match="refusing to write .*step0000002.ckpt"):
        run(cfg)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step0000001.ckpt"]  # the last good one; nothing half-written or NaN next to it


# ---------------------------------------------------------------------------------------------- processes
def _train(run_dir: Path, extra: list[str], env: dict[str, str], **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", f"run_dir={run_dir}", *CLI, *extra],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _wait_until(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"training ended early ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.05)


@pytest.mark.slow
def test_kill9_during_a_checkpoint_write_and_during_training_then_resume(tmp_path, reference):
    trace = tmp_path / "trace.jsonl"
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    args = ["trainer.max_steps=8", "checkpoint.every_n_steps=2", "checkpoint.keep=1"]

    # 1) kill -9 while step 4's checkpoint is being written (held open by the test-only delay).
    proc = _train(run_dir, args, {"VSEG_TEST_TRACE": str(trace), "VSEG_TEST_CHECKPOINT_DELAY_S": "3"})
    _wait_until(lambda: (ckpts / "step0000004.ckpt.tmp").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ckpts / "step0000002.ckpt").is_file()  # the last good one is intact...
    assert newest_checkpoint(ckpts).name == "step0000002.ckpt"  # ...and the torn write is never "newest"
    killed_at_1 = steps_in(trace)

    # 2) the same command resumes from step 2; kill -9 in the middle of training (step 7, after step 6's save).
    # Saves are slowed again so that a kill landing after step 7 (the tiny steps are fast) still finds step 8's
    # checkpoint unfinished: the test does not depend on how quickly it polls.
    proc = _train(run_dir, args, {"VSEG_TEST_TRACE": str(trace), "VSEG_TEST_CHECKPOINT_DELAY_S": "3"})
    _wait_until(lambda: steps_in(trace) >= 7, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert newest_checkpoint(ckpts).name == "step0000006.ckpt"
    assert not (ckpts / "step0000002.ckpt").exists()  # keep=1 rotated it once step 4 was complete

    # 3) resume again and finish.
    proc = _train(run_dir, args, {"VSEG_TEST_TRACE": str(trace)})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert_continues(read_trace(trace), reference)
    assert killed_at_1 >= 3  # steps 2 and 3 had run: they were lost and redone (work since the checkpoint)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, reference, monkeypatch):
    trace = tmp_path / "trace.jsonl"
    run_dir = tmp_path / "run"
    proc = _train(run_dir, ["trainer.max_steps=8", "checkpoint.every_n_steps=100"], {"VSEG_TEST_TRACE": str(trace)})
    _wait_until(lambda: steps_in(trace) >= 2, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert time.monotonic() - sent < 30
    assert "Traceback" not in err
    assert "SIGTERM received" in err and "stopped by SIGTERM at step" in out
    saved = newest_checkpoint(run_dir / "checkpoints")
    stopped_at = int(saved.name[4:11])
    assert stopped_at >= 2 and f"step{stopped_at:07d}.ckpt" in out
    assert not (run_dir / "weights").exists()  # an interrupted run does not pose as a finished one

    monkeypatch.setenv("VSEG_TEST_TRACE", str(trace))
    result = run(tiny_cfg([f"run_dir={run_dir}", "trainer.max_steps=8", "checkpoint.every_n_steps=100", *FAST]))
    assert result.resumed_from == saved and result.global_step == 8
    assert_continues(read_trace(trace), reference)  # nothing lost: not even the step in flight at SIGTERM


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by a container's init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_raising_rank_stops_both_ranks_promptly(tmp_path):
    trace = tmp_path / "trace.jsonl"
    proc = _train(
        tmp_path / "run",
        ["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=50", "data.num_samples=16"],
        {"VSEG_TEST_TRACE": str(trace), "VSEG_TEST_RAISE_AT": "2:1"},
    )
    out, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    pids = {json.loads(x)["pid"] for x in trace.read_text().splitlines()}
    assert len(pids) == 2
    raised = trace.stat().st_mtime  # the last micro-batch traced before the failure
    assert time.time() - raised < 60, "the job took too long to stop after rank 1 raised"
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)  # no rank left behind
    assert err.count("RuntimeError: VSEG_TEST_RAISE_AT: injected failure on rank 1 at step 2") >= 1
    assert err.count("Traceback") == 1, err[-4000:]  # the error is shown once, by the rank that raised
    assert "rank 1 failed at step 2" in out + err


@pytest.mark.slow
def test_oom_on_one_rank_gives_the_advice_and_stops_every_rank_with_status_4(tmp_path):
    """An out-of-memory error on rank 1 of 2 (gloo DDP): the planner's explanation instead of a stack
    trace, the other rank stopped by its watchdog, and status 4 from the job as on a single device."""
    trace = tmp_path / "trace.jsonl"
    proc = _train(
        tmp_path / "run",
        [
            "strategy=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_steps=50",
            "data.num_samples=16",
            "plan.gpu_memory=24GB",
        ],
        {"VSEG_TEST_TRACE": str(trace), "VSEG_TEST_OOM_AT": "train:2:1"},
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 4, err[-4000:]
    pids = {json.loads(x)["pid"] for x in trace.read_text().splitlines()}
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)
    assert "Traceback" not in err, err[-4000:]
    assert "vseg: out of GPU memory during training at step 2 (rank 1)" in err
    assert "what to do, fastest setting that fits first:" in err and "GB/GPU" in err
    assert "rank 0: stopping because rank 1 ran out of GPU memory at step 2" in err


@pytest.mark.slow
def test_ddp_sigterm_to_rank0_only_saves_collectively_and_resumes(tmp_path):
    """Only rank 0 gets SIGTERM (as from `kill`): the stop decision is all-reduced, so both gloo ranks
    finish the same optimizer step and take part in the save; the same command then finishes the run."""
    trace = tmp_path / "trace.jsonl"
    run_dir = tmp_path / "run"
    args = ["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.num_samples=16"]
    proc = _train(
        run_dir, [*args, "trainer.max_steps=6", "checkpoint.every_n_steps=100"], {"VSEG_TEST_TRACE": str(trace)}
    )
    _wait_until(lambda: steps_in(trace) >= 1, proc)
    rows = [json.loads(x) for x in trace.read_text().splitlines()]
    os.kill(next(r["pid"] for r in rows if r["rank"] == 0), signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    saved = newest_checkpoint(run_dir / "checkpoints")
    stopped_at = int(saved.name[4:11])
    rows = [json.loads(x) for x in trace.read_text().splitlines()]
    assert {r["step"] for r in rows if r["rank"] == 1} == set(range(stopped_at))  # rank 1 stopped at the same step
    assert "Traceback" not in err

    proc = _train(
        run_dir, [*args, "trainer.max_steps=6", "checkpoint.every_n_steps=100"], {"VSEG_TEST_TRACE": str(trace)}
    )
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    rows = [json.loads(x) for x in trace.read_text().splitlines()]
    resumed = rows[sum(1 for r in rows if r["step"] < stopped_at) :]  # the first run traced only those
    assert min(r["step"] for r in resumed) == stopped_at and steps_in(trace) == 5


# ---------------------------------------------------------------------------------------------- GPU (run elsewhere)
@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_deepspeed_sigterm_and_kill9_resume(tmp_path, strategy):
    """ZeRO-2/3 on 2 GPUs: SIGTERM saves a complete checkpoint directory; a kill -9 during a checkpoint
    write leaves the previous one the newest; the resumed run reaches max_steps."""
    trace = tmp_path / "trace.jsonl"
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    args = [f"strategy={strategy}", "trainer=gpu", "trainer.devices=2", "trainer.max_steps=8"]
    proc = _train(run_dir, [*args, "checkpoint.every_n_steps=100"], {"VSEG_TEST_TRACE": str(trace)})
    _wait_until(lambda: steps_in(trace) >= 2, proc, timeout=600)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    saved = newest_checkpoint(ckpts)
    assert saved is not None and saved.is_dir() and (saved / COMPLETE_MARKER).is_file()

    proc = _train(
        run_dir,
        [*args, "checkpoint.every_n_steps=2"],
        {"VSEG_TEST_TRACE": str(trace), "VSEG_TEST_CHECKPOINT_DELAY_S": "5"},
    )
    _wait_until(lambda: any(p.name.endswith(".tmp") for p in ckpts.iterdir()), proc, timeout=600)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(15)  # the other rank is stopped by its watchdog (the store died with rank 0) within 10 s
    assert newest_checkpoint(ckpts) is not None and not newest_checkpoint(ckpts).name.endswith(".tmp")

    proc = _train(run_dir, [*args, "checkpoint.every_n_steps=2"], {"VSEG_TEST_TRACE": str(trace)})
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert steps_in(trace) == 7
