"""The console of the front doors: each line once, no library noise, and the next command at the end.

`train.py` and `predict.py` run for real in subprocesses (stdout and stderr in one stream, as a terminal
shows them); what is checked is what a terminal is left showing, as progress bars redraw their rows.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TRAIN = [
    "data.num_samples=16",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "checkpoint.every_n_steps=3",  # step checkpoints and last.ckpt: Lightning's save path runs
    "trainer.enable_model_summary=true",  # vseg's summary table runs too (off by default)
]

#: Text that must not reach the console, with the reason.
NOISE = {
    "FutureWarning": "a library deprecation warning",
    "is deprecated": "a library deprecation warning (Lightning prints some without their category)",
    "weights_only": "Lightning announcing its checkpoint default; reads like a security warning",
    "Total FLOPs": "Lightning's summary counts FLOPs only with an example input: always 0 here",
    "FLOPs": "same",
    "v_num": "the logger version in the progress bar (`oard`, from the tensorboard folder)",
    "Traceback": "an exception",
    "INFO:": "Lightning's own handler next to the root handler: every line twice",
    "💡 Tip": "Lightning's advertisement",
}


def _run(script: str, args: list[str]) -> str:
    proc = subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=300,
    )
    out = proc.stdout.decode("utf-8", errors="replace")  # bytes: text mode would turn "\r" into line breaks
    assert proc.returncode == 0, out[-4000:]
    return out


def _screen(text: str) -> list[str]:
    """The rows a terminal ends up showing (non-empty ones): tqdm redraws its bars with carriage returns and
    cursor-up moves, and clears finished bars with spaces; log lines printed through tqdm land between them."""
    rows, r, c = [""], 0, 0
    for token in re.split(r"(\r|\n|\x1b\[A)", text):
        if token == "\n":
            r, c = r + 1, 0
            if r == len(rows):
                rows.append("")
        elif token == "\r":
            c = 0
        elif token == "\x1b[A":
            r = max(r - 1, 0)
        elif token:
            token = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", token)
            row = rows[r].ljust(c)
            rows[r] = row[:c] + token + row[c + len(token) :]
            c += len(token)
    return [row.rstrip() for row in rows if row.strip()]


def _check_clean(text: str) -> None:
    found = {word: why for word, why in NOISE.items() if word in text}
    assert not found, f"{found}\n---\n{text[-4000:]}"
    shown = _screen(text)
    repeats = [a for a, b in zip(shown, shown[1:], strict=False) if a == b]
    assert not repeats, f"printed twice in a row: {repeats}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("console") / "run"
    return run_dir, _run("train.py", [f"run_dir={run_dir}", *TRAIN])


@pytest.mark.slow
def test_train_console_is_clean(trained):
    _, out = trained
    _check_clean(out)
    for once in ("Seed set to 42", "GPU available:", "`Trainer.fit` stopped", "parameters: trainable"):
        assert out.count(once) == 1, f"{once!r} x{out.count(once)}"


@pytest.mark.slow
def test_train_ends_with_the_run_directory_and_the_next_command(trained):
    run_dir, out = trained
    tail = _screen(out)[-4:]
    assert tail[0] == f"run directory: {run_dir}", tail
    assert tail[1] == f"TensorBoard:   tensorboard --logdir {run_dir}"
    assert tail[2] == f"predict:       python predict.py ckpt={run_dir} input=<image|folder|glob> output=<dir>"
    assert str(run_dir / "predictions") in tail[3]
    assert (run_dir / "weights" / "trainable.safetensors").is_file() and (run_dir / "config.yaml").is_file()


@pytest.mark.slow
def test_predict_console_is_clean_and_names_its_results(trained):
    run_dir, _ = trained
    out = _run("predict.py", [f"ckpt={run_dir}"])  # the command train.py suggests, without input=
    _check_clean(out)
    tail = _screen(out)[-2:]
    results, summary = run_dir / "predictions" / "results.jsonl", run_dir / "predictions" / "summary.json"
    assert tail == [f"per input: {results}", f"summary:   {summary}"]
    assert json.loads(summary.read_text())["ok"] == len(results.read_text().splitlines())


@pytest.mark.slow
def test_two_rank_train_console_is_clean(tmp_path):
    """Two CPU ranks (gloo DDP) with validation: epoch-level metrics logged once, without Lightning's
    advice to sync them (the metrics are already gathered across ranks before they are logged)."""
    args = ["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.num_samples=16"]
    out = _run(
        "train.py",
        [
            f"run_dir={tmp_path / 'run'}",
            *args,
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
        ],
    )
    _check_clean(out)
    assert "sync_dist" not in out, out[-4000:]
    for once in ("Seed set to 42", "parameters: trainable"):  # rank 1 stays quiet
        assert out.count(once) == 1, f"{once!r} x{out.count(once)}"


def test_finished_message_quotes_a_run_directory_with_spaces(tmp_path):
    from vseg.training.run import finished_message

    run_dir = tmp_path / "my runs" / "a"
    assert f"python predict.py 'ckpt={run_dir}' input=" in finished_message(run_dir)


def test_model_summary_has_no_flops(caplog):
    from vseg.console import ModelSummary

    data = [
        (" ", ["0"]),
        ("Name", ["model"]),
        ("Type", ["Sa2VA"]),
        ("Params", ["528 K"]),
        ("Mode", ["train"]),
        ("FLOPs", ["0"]),
    ]
    with caplog.at_level(logging.INFO, logger="vseg.console"):
        ModelSummary.summarize(data, 528_873, 88_548, 2.1, {"train": 408, "eval": 0}, total_flops=0)
    assert "FLOPs" not in caplog.text and "Mode" not in caplog.text
    assert "model  Sa2VA  528 K" in caplog.text and "trainable 88.5 K" in caplog.text
