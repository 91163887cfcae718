"""Issue 16 (processes and the file system): loader workers end with their parent, however it dies;
unwritable or full storage gives one message naming the path and what is needed (no stack trace, exit 5,
no temporary file left, the previous checkpoint still the newest); a resumed run's TensorBoard curves show
every step once; every file of a run directory has the mode a plain `open()` gives.

Tests may run as root, where a chmod-ed folder does not stop writes: unwritable locations are then a path
under a regular file (ENOTDIR) or a sysfs path (EPERM/EROFS), which no user can create.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vseg.artifacts.checkpoints import newest_checkpoint
from vseg.artifacts.files import STORAGE_EXIT_CODE, StorageError, atomic_write, check_writable, file_mode
from vseg.data.synthetic import generate_vessels
from vseg.training.run import run

from conftest import ROOT, tiny_cfg

CLI = [
    "data.num_samples=8",
    "data.batch_size=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.num_sanity_val_steps=0",
    "trainer.val_check_interval=null",
    "trainer.check_val_every_n_epoch=100",
]


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, _ = generate_vessels(seed=300 + i, size=64, style="angiogram")
        Image.fromarray(image).save(folder / f"im{i:03d}.png")
    return folder


def _gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by the container's init counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc: psutil is not needed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[-1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill9_then_workers_end(cmd: list[str], workers: int) -> None:
    """Starts `cmd`, waits until its loader workers exist, SIGKILLs it; every worker must be gone in 1.5 s.

    (Without the parent-death signal torch's workers notice only at their next 5-second poll, and a busy
    or blocked one much later.)
    """
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while len(kids := _descendants(proc.pid)) < workers:
            if proc.poll() is not None:
                raise AssertionError(
                    f"ended before its workers started ({proc.returncode}):\n{proc.stderr.read()[-3000:]}"
                )
            assert time.monotonic() < deadline, "no loader workers appeared"
            time.sleep(0.05)
        time.sleep(0.5)  # the workers are at work (prefetching)
        proc.kill()
        proc.wait(timeout=30)
        killed = time.monotonic()
        while not all(_gone(k) for k in kids) and time.monotonic() - killed < 1.5:
            time.sleep(0.05)
        left = [k for k in kids if not _gone(k)]
        for k in left:
            os.kill(k, signal.SIGKILL)
        assert not left, f"loader workers {left} outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# ---------------------------------------------------------------------------------------------- orphans
@pytest.mark.slow
def test_predict_workers_end_when_predict_is_killed(tmp_path):
    images = _images(tmp_path / "in", 48)
    cmd = [sys.executable, "predict.py", "ckpt=random", "model=tiny", f"input={images}", f"output={tmp_path / 'out'}"]
    _kill9_then_workers_end([*cmd, "batch_size=1", "num_workers=2", "writer_threads=1"], workers=2)


@pytest.mark.slow
def test_train_workers_end_when_train_is_killed(tmp_path):
    cmd = [sys.executable, "train.py", f"run_dir={tmp_path / 'run'}", *CLI, "trainer.max_steps=200"]
    _kill9_then_workers_end([*cmd, "data.num_workers=2", "checkpoint.every_n_steps=1000"], workers=2)


def test_a_worker_whose_parent_is_already_gone_exits_at_once(tmp_path):
    """The race the parent-death signal cannot cover: the parent died before the worker asked for it."""
    code = (
        "import os, sys, time\n"
        "from vseg.data.workers import WorkerInit\n"
        "init = WorkerInit()\n"
        "if os.fork() == 0:\n"  # the worker, started by a parent that then dies before it runs its init
        "    time.sleep(0.5)\n"
        f"    init(0); open({str(tmp_path / 'survived')!r}, 'w').close()\n"
        "    sys.exit(0)\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    time.sleep(2.0)
    assert not (tmp_path / "survived").exists()


# ---------------------------------------------------------------------------------------------- unwritable places
def _unwritable(kind: str, tmp_path: Path) -> Path:
    """A folder path nobody can create: under a regular file, or read-only (chmod; sysfs when root)."""
    if kind == "under_a_file":
        (tmp_path / "a_file").write_text("not a folder")
        return tmp_path / "a_file" / "runs"
    if os.geteuid() != 0:
        ro = tmp_path / "read_only"
        ro.mkdir()
        ro.chmod(0o555)
        return ro / "runs"
    path = Path("/sys/vseg-test-not-writable")
    try:
        path.mkdir()
    except OSError:
        return path / "runs"
    path.rmdir()
    pytest.skip("root can write under /sys here: no read-only location to test with")


def _needs(kind: str) -> str:
    return "is a file, not a folder" if kind == "under_a_file" else r"(permission|read-only file system)"


def _not_built(*args, **kwargs):
    raise AssertionError("the model was built before the output location was checked")


@pytest.mark.parametrize("kind", ["under_a_file", "read_only"])
@pytest.mark.parametrize("setting", ["runs_root", "run_dir"])
def test_train_refuses_an_unwritable_run_directory_before_building_anything(tmp_path, monkeypatch, kind, setting):
    target = _unwritable(kind, tmp_path)
    monkeypatch.setattr("vseg.training.run.model_for_run", _not_built)
    monkeypatch.setenv("VSEG_RUN_DIR", "")  # unset, and restored afterwards (run() sets it)
    with pytest.raises(StorageError) as caught:
        run(tiny_cfg([f"{setting}={target}"]))
    message = str(caught.value)
    assert message.startswith(f"cannot write the run directory (run_dir= / runs_root=) {target}"), message
    assert re.search(_needs(kind), message), message


def test_train_py_says_so_in_one_line_and_exits_5(tmp_path):
    target = _unwritable("under_a_file", tmp_path)
    proc = subprocess.run(
        [sys.executable, "train.py", f"run_dir={target}", *CLI, "trainer.max_steps=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == STORAGE_EXIT_CODE, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("vseg:")]
    assert lines == [
        f"vseg: cannot write the run directory (run_dir= / runs_root=) {target}: {target.parent} is a file, "
        "not a folder; choose another location"
    ]
    assert "parameters:" not in proc.stdout + proc.stderr  # refused before the model was built


@pytest.mark.parametrize("kind", ["under_a_file", "read_only"])
def test_predict_refuses_an_unwritable_output_before_loading_the_model(tmp_path, monkeypatch, kind):
    from vseg.config import compose
    from vseg.predict import run as predict

    target = _unwritable(kind, tmp_path)
    images = _images(tmp_path / "in", 2)
    monkeypatch.setattr("vseg.predict.load_predictor", _not_built)
    with pytest.raises(StorageError) as caught:
        predict(compose("predict", ["ckpt=random", "model=tiny", f"input={images}", f"output={target}"]))
    message = str(caught.value)
    assert message.startswith(f"cannot write the prediction output (output=) {target}: "), message
    assert re.search(_needs(kind), message), message


@pytest.mark.slow
def test_predict_py_says_so_in_one_line_and_exits_5(tmp_path):
    target = _unwritable("read_only", tmp_path)
    images = _images(tmp_path / "in", 2)
    proc = subprocess.run(
        [sys.executable, "predict.py", "ckpt=random", "model=tiny", f"input={images}", f"output={target}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == STORAGE_EXIT_CODE, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("vseg:")]
    assert len(lines) == 1 and str(target) in lines[0] and re.search(_needs("read_only"), lines[0]), lines


def test_check_writable_creates_nothing_and_accepts_new_folders(tmp_path):
    check_writable(tmp_path / "new" / "deeper", "run directory")
    assert list(tmp_path.iterdir()) == []  # probed, not created
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match=r"f is a file, not a folder"):
        check_writable(tmp_path / "f", "run directory")


# ---------------------------------------------------------------------------------------------- full disks
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_atomic_write_turns_refused_writes_into_one_message_and_leaves_no_temporary_file(tmp_path, code):
    def write(p: Path) -> None:
        p.write_bytes(b"half a file")
        raise OSError(code, os.strerror(code), str(p))

    target = tmp_path / "weights" / "trainable.safetensors"
    with pytest.raises(StorageError) as caught:
        atomic_write(target, write, "trained weights")
    message = str(caught.value)
    assert message.startswith(f"cannot write the trained weights {target}: ")
    expected = {
        errno.ENOSPC: r"no space left on the device \(.* free there\)",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: f"needs write permission in {target.parent}",
    }[code]
    assert re.search(expected, message), message
    assert list(target.parent.iterdir()) == []  # neither the file nor its temporary


def test_a_full_disk_during_prediction_is_one_message(tmp_path, monkeypatch):
    """A mask write and a journal append that hit a full disk both surface as the StorageError predict.py
    prints (exit 5); no temporary PNG is left."""
    import numpy as np

    import vseg.inference.outputs as outputs
    from vseg.inference.engine import ItemPrediction
    from vseg.inference.inputs import PredictItem

    png = outputs._png

    def full(array):
        def write(p: Path) -> None:
            png(array)(p)  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(p))

        return write

    monkeypatch.setattr(outputs, "_png", full)
    store = outputs.OutputStore(tmp_path / "out", overlays=False, workers=1).open()
    item = PredictItem(index=0, id="im0", prompt="vessels", image_path="im0.png")
    prediction = ItemPrediction(mask=np.zeros((4, 4), bool), answer="It is [SEG].", seg_tokens=1, mean_logit=0.0)
    store.submit(item, prediction, np.zeros((4, 4, 3), np.uint8), None, None, "teacher_forced")
    with pytest.raises(StorageError, match=r"cannot write the mask .*masks/im0.png: no space left on the device"):
        store.close()
    assert list((tmp_path / "out" / "masks").iterdir()) == []

    class FullJournal:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    store = outputs.OutputStore(tmp_path / "out", workers=1).open()
    store._journal = FullJournal()
    with pytest.raises(StorageError, match=r"cannot write the prediction journal .*rank0.jsonl: no space left"):
        store.fail(item, "unreadable")


def _disk_full_at(name: str) -> str:
    """Python code that makes every checkpoint write named `name` hit a full disk half way."""
    return (
        "import errno, torch\n"
        "_save = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        f"    if {name!r} in str(getattr(f, 'name', f)):\n"
        "        f.write(b'x' * 4096)\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return _save(obj, f, *a, **k)\n"
    )


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_newest(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    namespace: dict = {}
    exec(_disk_full_at("step0000002.ckpt"), namespace)
    monkeypatch.setattr(torch, "save", namespace["save"])
    cfg = tiny_cfg([f"run_dir={run_dir}", "trainer.max_steps=3", "checkpoint.every_n_steps=1", *CLI[3:]])
    with pytest.raises(StorageError) as caught:
        run(cfg)
    message = str(caught.value)
    ours = ckpts / "step0000002.ckpt"
    assert message.startswith(f"cannot write the checkpoint {ours}: no space left on the device (")
    assert "free there, about " in message and " needed)" in message  # the last checkpoint's size
    assert message.endswith(f"the newest complete checkpoint is still {ckpts / 'step0000001.ckpt'}")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step0000001.ckpt"]  # no .tmp, nothing half-written
    assert newest_checkpoint(ckpts).name == "step0000001.ckpt"


@pytest.mark.slow
def test_train_py_exits_with_one_line_when_the_disk_fills_during_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", *CLI, "trainer.max_steps=3", "checkpoint.every_n_steps=1"]
    code = (
        _disk_full_at("step0000002.ckpt")
        + "torch.save = save\n"
        + (f"import runpy, sys\nsys.argv = ['train.py', *{args!r}]\nrunpy.run_path('train.py', run_name='__main__')\n")
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == STORAGE_EXIT_CODE, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("vseg:")]
    assert len(lines) == 1 and "step0000002.ckpt: no space left on the device" in lines[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step0000001.ckpt"]


# ---------------------------------------------------------------------------------------------- TensorBoard
@pytest.mark.slow
def test_a_resumed_run_logs_every_step_once_in_tensorboard(tmp_path):
    """kill -9 after step 6 with the last checkpoint at step 4: steps 4 and 5 were logged, are run again and
    logged again. The resumed writer purges the earlier file's events from step 4 on."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    cfg = [f"run_dir={run_dir}", "checkpoint.every_n_steps=2", "checkpoint.keep=10", "trainer.log_every_n_steps=1"]
    run(tiny_cfg([*cfg, "trainer.max_steps=6", *CLI[3:]]))
    # what a kill -9 just before step 6's checkpoint leaves behind: the events of steps 0-5, checkpoints to 4
    for name in ("step0000006.ckpt", "last.ckpt"):
        (ckpts / name).unlink()
    assert newest_checkpoint(ckpts).name == "step0000004.ckpt"
    time.sleep(1.1)  # a new event file (its name holds the time in seconds)
    resumed = run(tiny_cfg([*cfg, "trainer.max_steps=8", *CLI[3:]]))
    assert resumed.resumed_from.name == "step0000004.ckpt" and resumed.global_step == 8
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert sorted(steps) == list(range(8)) or sorted(steps) == list(range(1, 9)), steps  # each step once


# ---------------------------------------------------------------------------------------------- file modes
def test_every_file_of_a_run_directory_has_the_mode_open_gives(tmp_path):
    run_dir = tmp_path / "run"
    old = os.umask(0o027)  # not the default, so a file with a hard-coded 0644 or 0600 shows up
    try:
        run(tiny_cfg([f"run_dir={run_dir}", "checkpoint.every_n_steps=1"]))
        with open(tmp_path / "plain", "w"):
            pass
        expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    finally:
        os.umask(old)
    assert expected == 0o640 and file_mode() == 0o666 & ~old
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {p.relative_to(run_dir).as_posix() for p in files} >= {
        "config.yaml",
        "weights/trainable.safetensors",
        "checkpoints/last.ckpt",
        "checkpoints/step0000002.ckpt",
    }
    modes = {p.relative_to(run_dir).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(expected)}, modes
