"""Runs through predict.py beyond one device and one answer mode (issue 19): data-parallel over runs (2 CPU
processes), `answer_mode=generate` on the key frames, and the message a model too narrow to track gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_video import VIDEO_MODEL, _frames, _mp4
from vseg.cli import compose
from vseg.config import ConfigError
from vseg.predict import run as predict

from conftest import ROOT, tiny_cfg


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _frame_masks(out: Path) -> dict[tuple[str, str], np.ndarray]:
    return {
        (r["run"], r["name"]): np.asarray(Image.open(out / r["mask"])) for r in _records(out) if r["kind"] == "frame"
    }


def _runs_folder(root: Path) -> Path:
    """Three short clips of different sizes and lengths, and one broken file."""
    root.mkdir(parents=True)
    for i, (n, h, w) in enumerate([(4, 40, 56), (3, 48, 48), (5, 32, 64)]):
        _mp4(root / f"clip{i}.mp4", _frames(n, h, w, seed=i))
    (root / "broken.mp4").write_bytes(b"not a video")
    return root


@pytest.mark.slow
def test_runs_data_parallel_over_two_cpu_processes_equals_one_device(tmp_path):
    runs = _runs_folder(tmp_path / "runs")
    common = ["ckpt=random", "model=tiny", *VIDEO_MODEL, f"input={runs}", "key_frames=2", "overlay_format=gif"]
    one = predict(compose("predict", [*common, f"output={tmp_path / 'one'}"]))
    assert one["runs"] == 4 and one["ok"] == 3 and one["failed"] == 1

    def two_processes() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "predict.py"), *common, f"output={tmp_path / 'two'}", "devices=2",
             "accelerator=cpu"],
            cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip

    proc = two_processes()
    assert proc.returncode == 1, proc.stderr[-3000:]  # the broken file: exit 1, as for images
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (two["runs"], two["ok"], two["failed"], two["frames"]) == (4, 3, 1, one["frames"])
    assert two["placement"] == "data-parallel x2 (cpu)"
    assert "broken.mp4" in two["failures"][0]["path"] and "broken" in two["failures"][0]["error"].lower()
    # merged in input order, each run once; every rank wrote its own disjoint share
    one_runs = [(r["id"], r["status"]) for r in _records(tmp_path / "one") if r["kind"] == "run"]
    two_runs = [(r["id"], r["status"]) for r in _records(tmp_path / "two") if r["kind"] == "run"]
    assert one_runs == two_runs
    journals = sorted((tmp_path / "two" / "progress").glob("runs.rank*.jsonl"))
    per_rank = [{json.loads(line)["id"] for line in j.read_text().splitlines()} for j in journals]
    assert len(per_rank) == 2 and all(per_rank) and not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == {run_id for run_id, _ in one_runs}
    a, b = _frame_masks(tmp_path / "one"), _frame_masks(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 12 and all(np.array_equal(a[k], b[k]) for k in a)
    assert all((tmp_path / "two" / f"overlays/clip{i}.gif").is_file() for i in range(3))
    # resume: the finished runs are skipped on both ranks, only the broken file is tried again
    proc = two_processes()
    assert proc.returncode == 1, proc.stderr[-3000:]
    again = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert again["skipped_done"] == 3 and again["predicted_now"] == 1 and again["ok"] == 3


def test_a_tiny_preset_refuses_runs_naming_the_width_field(tmp_path):
    clip = _mp4(tmp_path / "clip.mp4", _frames(3, 32, 32))
    cfg = compose("predict", ["ckpt=random", "model=tiny", f"input={clip}", f"output={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=r"fpn_hidden_size=32.*multiple of 64") as err:
        predict(cfg)
    assert "cannot predict runs" in str(err.value) and "fpn_hidden_size=64" in str(err.value)
    assert tiny_cfg().model.sam2["vision_config"]["fpn_hidden_size"] == 32  # (what the message is about)


@pytest.mark.slow
def test_generate_answers_on_the_key_frames_and_tracks_the_generated_seg(tmp_path):
    from vseg.config import load_predict_config
    from vseg.inference.predictor import Predictor
    from vseg.inference.run_outputs import RunStore, predict_runs

    clip = _mp4(tmp_path / "clip.mp4", _frames(4, 40, 56))
    predictor = Predictor.load("random", model=tiny_cfg(VIDEO_MODEL).model, answer="generate", max_new_tokens=3)
    out = tmp_path / "out"
    opts = load_predict_config(
        compose("predict", ["ckpt=random", f"input={clip}", f"output={out}", "answer_mode=generate", "key_frames=2"])
    )
    store = RunStore(out, overlays=False)
    # a random model answers without [SEG] (here: at once a stop token): no embedding, empty masks, its text kept
    quiet = predictor.predict_video(clip, key_frames=2)
    assert quiet.seg_tokens == 0 and not quiet.masks.any() and "[SEG]" not in quiet.answer
    # a model that answers with [SEG] (transformers' sequence_bias on its generation config)
    seg = predictor.tokenizer.convert_tokens_to_ids("[SEG]")
    predictor.model.base_mllm.generation_config.sequence_bias = [[[seg], 100.0]]
    predict_runs(lambda: predictor, [(0, "clip", clip)], store, opts, single=True)
    record = store.records()["clip"]
    assert record["status"] == "ok" and record["answer"] == "[SEG][SEG][SEG]" and record["seg_tokens"] == 3
    masks = np.stack([np.asarray(Image.open(out / f["mask"])) > 0 for f in record["frames"]])
    # the generated sequence's [SEG] states are the teacher-forced ones of the same answer: the same masks
    forced = Predictor(
        predictor.source, predictor.model, predictor.tokenizer, predictor.processor, device=predictor.device,
        dtype=predictor.dtype, answer="teacher_forced", answer_text=record["answer"],
    ).predict_video(clip, key_frames=2)  # fmt: skip
    assert forced.seg_tokens == 3 and forced.masks.any() and not forced.masks.all()
    assert np.array_equal(masks, forced.masks)


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.skipif(
    not __import__("torch").cuda.is_available() or __import__("torch").cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_a_run_with_the_model_split_over_two_gpus_equals_one_gpu(tmp_path):
    """`device_map=sequential` with a budget that puts the LLM and SAM-2 on different GPUs: the [SEG] prompt
    crosses devices on the key frames and tracking runs where SAM-2 lives; masks as on one GPU (float32)."""
    clip = tmp_path / "clip.mp4"
    _mp4(clip, _frames(5, 48, 64, seed=3))
    common = ["ckpt=random", "model=tiny", *VIDEO_MODEL, f"input={clip}", "key_frames=2", "dtype=float32"]
    one_cfg = compose("predict", [*common, f"output={tmp_path / 'one'}", "device=cuda:0"])
    predict(one_cfg)
    # the image test's budget (tests/test_predict_parallel.py): a bit over half the model on GPU 0, the rest on 1
    from vseg.artifacts.sources import preset
    from vseg.model.random_init import build_meta

    size = sum(p.numel() * 4 for p in build_meta(preset("tiny"))[0].parameters())  # the 64-wide SAM-2 adds a little
    budget = f"{{0: {int(size * 0.55)}, 1: {size}}}"
    predict(
        compose("predict", [*common, f"output={tmp_path / 'split'}", "device_map=sequential", f"max_memory={budget}"])
    )
    a, b = _frame_masks(tmp_path / "one"), _frame_masks(tmp_path / "split")
    assert a.keys() == b.keys() and len(a) == 5
    agree = [float((a[k] == b[k]).mean()) for k in a]
    assert min(agree) > 0.999, agree
