"""predict.py on the tiny model: every checkpoint form and input form, outputs and metrics, generation vs
the teacher-forced fast path, bad inputs, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from vseg.config import ConfigError, compose
from vseg.data.synthetic import generate_vessels
from vseg.export import run as export
from vseg.inference.scoring import cldice, score_masks
from vseg.predict import run as predict
from vseg.training.run import run as train

from conftest import ROOT, tiny_cfg


def _cfg(*overrides: str, **values):
    return OmegaConf.merge(compose("predict", list(overrides)), values)


def _results(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def _masks(out: Path) -> dict[str, np.ndarray]:
    return {r["id"]: np.asarray(Image.open(out / r["mask"])) for r in _results(out) if r["status"] == "ok"}


def _images(folder: Path, n: int, masks: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, mask = generate_vessels(seed=200 + i, size=80 + 16 * i, style="angiogram")
        Image.fromarray(image).save(folder / f"im{i}.png")
        if masks:
            (folder.parent / "gt").mkdir(exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder.parent / "gt" / f"im{i}.png")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained 6 steps (it already answers "It is[SEG]..."), its images and exports."""
    root = tmp_path_factory.mktemp("predict")
    run_dir = root / "run"
    result = train(
        tiny_cfg(
            [
                f"run_dir={run_dir}",
                "trainer.max_steps=6",
                "trainer.val_check_interval=6",
                "optim.lr=1e-2",
                "checkpoint.every_n_steps=6",
            ]
        )
    )
    images = _images(root / "in", 3, masks=True)
    return {"root": root, "run": run_dir, "result": result, "images": images}


def test_default_is_the_runs_validation_split(trained):
    out = trained["root"] / "default"
    summary = predict(_cfg(f"ckpt={trained['run']}", output=str(out), batch_size=3))
    lines = _results(out)
    assert summary["images"] == len(lines) == 1 and lines[0]["status"] == "ok"  # 8 samples, val_fraction 0.125
    assert (out / lines[0]["mask"]).is_file() and (out / lines[0]["overlay"]).is_file()
    # the rebuilt model (seeded base + saved weights, LoRA merged) scores as the run's last validation did
    assert summary["dice"] == pytest.approx(trained["result"].metrics["val/dice"], abs=1e-6)
    assert {"dice", "iou", "precision", "recall", "cldice", "foreground", "prompt", "answer"} <= set(lines[0])
    assert (
        lines[0]["answer"] == "It is [SEG]." and lines[0]["prompt"] == "Please segment the blood vessels in this image."
    )
    mask = np.asarray(Image.open(out / lines[0]["mask"]))
    assert mask.shape == tuple(lines[0]["size"]) and set(np.unique(mask)) <= {0, 255}
    assert json.loads((out / "summary.json").read_text())["dice"] == pytest.approx(summary["dice"])


def test_every_checkpoint_form_gives_the_same_masks(trained, tmp_path):
    run_dir = trained["run"]
    forms = {"run": str(run_dir), "lightning": str(run_dir / "checkpoints" / "last.ckpt")}
    for fmt in ("native", "official", "adapter"):
        export(compose("export", [f"ckpt={run_dir}", f"out={tmp_path / fmt}", f"format={fmt}"]))
        forms[fmt] = str(tmp_path / fmt)
    # The layout Lightning's DeepSpeedStrategy writes (frozen parameters excluded): <dir>/<tag>/mp_rank_00_model_states.pt
    # with the wrapped module's weights (and its persistent buffers); the real one is tested on a GPU.
    # DeepSpeed's module_state_dict(exclude_frozen_parameters=True): the wrapped LightningModule's state_dict
    # minus the frozen named_parameters — buffers and second names of tied tensors stay in (seen on the GPU).
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    lightning_module = trained["result"].module
    state = lightning_module.state_dict()
    for name, p in lightning_module.named_parameters():
        if not p.requires_grad:
            state.pop(name)
    state.update(ckpt["state_dict"])  # the trained values (the module object may have moved on)
    ds = run_dir / "checkpoints" / "ds.ckpt"
    (ds / "checkpoint").mkdir(parents=True)
    (ds / "latest").write_text("checkpoint")
    module = {f"_forward_module.{k}": v.to(torch.bfloat16).float() for k, v in state.items()}
    torch.save({"module": module, "global_steps": 6}, ds / "checkpoint" / "mp_rank_00_model_states.pt")
    forms["deepspeed"] = str(ds)
    masks, logits = {}, {}
    for name, ckpt_path in forms.items():
        out = tmp_path / f"out_{name}"
        summary = predict(_cfg(f"ckpt={ckpt_path}", input=str(trained["images"]), output=str(out)))
        assert summary["ok"] == 3 and summary["ckpt"].startswith(name if name != "official" else "official"), summary
        masks[name] = _masks(out)
        logits[name] = [r["mean_logit"] for r in _results(out)]
    for name in forms:
        tol = 2e-2 if name == "deepspeed" else 1e-4  # deepspeed: weights rounded to bf16 as DeepSpeed saves them
        assert logits[name] == pytest.approx(logits["run"], rel=tol, abs=tol), name
        if name != "deepspeed":
            assert all(np.array_equal(masks[name][k], masks["run"][k]) for k in masks["run"]), name


def test_released_folder_preset_is_derived_or_checked(trained, tmp_path):
    folder = tmp_path / "released"
    export(compose("export", [f"ckpt={trained['run']}", f"out={folder}", "format=official"]))
    one = predict(
        _cfg(f"ckpt={folder}", "model=tiny", input=str(trained["images"] / "im0.png"), output=str(tmp_path / "a"))
    )
    assert one["ok"] == 1
    with pytest.raises(ConfigError, match="does not match model=tiny_qwen2_5vl"):
        predict(
            _cfg(f"ckpt={folder}", "model=tiny_qwen2_5vl", input=str(trained["images"]), output=str(tmp_path / "b"))
        )


def test_every_input_form(trained, tmp_path):
    run_dir, images = str(trained["run"]), trained["images"]
    single = predict(_cfg(f"ckpt={run_dir}", input=str(images / "im1.png"), output=str(tmp_path / "file")))
    folder = predict(_cfg(f"ckpt={run_dir}", input=str(images), output=str(tmp_path / "folder")))
    glob = predict(_cfg(f"ckpt={run_dir}", input=str(images / "im[02].png"), output=str(tmp_path / "glob")))
    listing = tmp_path / "list.txt"
    listing.write_text(
        f"# image<TAB>mask\n{images / 'im2.png'}\t{images.parent / 'gt' / 'im2.png'}\n{images / 'im0.png'}\n"
    )
    listed = predict(_cfg(f"ckpt={run_dir}", input=str(listing), output=str(tmp_path / "list")))
    assert (single["images"], folder["images"], glob["images"], listed["images"]) == (1, 3, 2, 2)
    assert [r["id"] for r in _results(tmp_path / "glob")] == ["im0", "im2"]
    rows = _results(tmp_path / "list")
    assert "dice" in rows[0] and "dice" not in rows[1] and listed["with_ground_truth"] == 1
    # every mask at its input's own size; the same image gives the same mask whatever the input form
    size = Image.open(images / "im1.png").size
    assert Image.open(tmp_path / "file" / "masks" / "im1.png").size == size
    assert np.array_equal(_masks(tmp_path / "file")["im1"], _masks(tmp_path / "folder")["im1"])
    # a dataset config with masks and fields of view: data=folders
    root = tmp_path / "ds"
    (root / "masks").mkdir(parents=True)
    (root / "fov").mkdir()
    for i in range(3):
        image, mask = generate_vessels(seed=300 + i, size=96, style="fundus")
        Image.fromarray(image).save(root / f"s{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"s{i}.png")
        fov = np.zeros((96, 96), np.uint8)
        fov[8:88, 8:88] = 255
        Image.fromarray(fov).save(root / "fov" / f"s{i}.png")
    data = predict(
        _cfg(
            f"ckpt={run_dir}",
            "data=folders",
            f"data.root={root}",
            "data.fov_pattern='fov/{id}.png'",
            output=str(tmp_path / "data"),
        )
    )
    rows = _results(tmp_path / "data")
    assert data["images"] == 3 and all(r["fov"] is True and "cldice" in r for r in rows)
    pred = np.asarray(Image.open(tmp_path / "data" / rows[0]["mask"])) > 0
    truth = np.asarray(Image.open(root / "masks" / "s0.png")) > 0
    fov = np.asarray(Image.open(root / "fov" / "s0.png")) > 0
    assert rows[0]["dice"] == pytest.approx(score_masks(pred, truth, fov)["dice"])
    synthetic = predict(
        _cfg(f"ckpt={run_dir}", "data=synthetic", "data.num_samples=4", split="val", output=str(tmp_path / "syn"))
    )
    assert synthetic["images"] == 1 and synthetic["with_ground_truth"] == 1


def test_generate_gives_the_teacher_forced_masks_for_the_same_answer(trained, tmp_path):
    run_dir, images = str(trained["run"]), str(trained["images"])
    gen = predict(
        _cfg(
            f"ckpt={run_dir}",
            input=images,
            output=str(tmp_path / "gen"),
            answer="generate",
            max_new_tokens=3,
            batch_size=2,
        )
    )
    answers = {r["answer"] for r in _results(tmp_path / "gen")}
    assert gen["ok"] == 3 and len(answers) == 1
    answer = answers.pop()
    assert "[SEG]" in answer, answer  # the trained run answers with a [SEG]
    forced = predict(
        _cfg(f"ckpt={run_dir}", input=images, output=str(tmp_path / "tf"), answer_text=answer, batch_size=2)
    )
    a, b = _masks(tmp_path / "gen"), _masks(tmp_path / "tf")
    assert forced["ok"] == 3 and all(np.array_equal(a[k], b[k]) for k in a)
    la = [r["mean_logit"] for r in _results(tmp_path / "gen")]
    lb = [r["mean_logit"] for r in _results(tmp_path / "tf")]
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-5)


def test_bad_inputs_give_clear_messages(trained, tmp_path):
    run_dir = str(trained["run"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        predict(_cfg(f"ckpt={run_dir}", input=str(empty), output=str(tmp_path / "o1")))
    with pytest.raises(ConfigError, match="matches no image files"):
        predict(_cfg(f"ckpt={run_dir}", input=str(tmp_path / "*.png"), output=str(tmp_path / "o2")))
    with pytest.raises(ConfigError, match="not a checkpoint form"):
        predict(_cfg(f"ckpt={empty}", input=str(trained["images"]), output=str(tmp_path / "o3")))
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"junk")
    with pytest.raises(ConfigError, match="file is not a checkpoint form"):
        predict(_cfg(f"ckpt={weights}", input=str(trained["images"]), output=str(tmp_path / "o4")))
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (other / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a checkpoint vseg can load"):
        predict(_cfg(f"ckpt={other}", input=str(trained["images"]), output=str(tmp_path / "o5")))
    with pytest.raises(ConfigError, match="needs model=<preset>"):
        predict(_cfg("ckpt=random", input=str(trained["images"]), output=str(tmp_path / "o6")))
    # a checkpoint of another model: the Lightning checkpoint of this run under a run config of another family
    alien = tmp_path / "alien"
    (alien / "checkpoints").mkdir(parents=True)
    cfg = OmegaConf.load(trained["run"] / "config.yaml")
    cfg.model = OmegaConf.load(ROOT / "conf" / "model" / "tiny_qwen2_5vl.yaml").model
    OmegaConf.save(cfg, alien / "config.yaml")
    (alien / "checkpoints" / "last.ckpt").write_bytes((trained["run"] / "checkpoints" / "last.ckpt").read_bytes())
    with pytest.raises(ConfigError, match="another model family"):
        predict(
            _cfg(
                f"ckpt={alien / 'checkpoints' / 'last.ckpt'}", input=str(trained["images"]), output=str(tmp_path / "o7")
            )
        )


def test_unreadable_input_is_recorded_and_the_run_goes_on(trained, tmp_path):
    folder = _images(tmp_path / "in", 2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), f"ckpt={trained['run']}", f"input={folder}", f"output={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]  # some input failed
    rows = {r["id"]: r for r in _results(out)}
    assert rows["broken"]["status"] == "failed" and "cannot be read as an image" in rows["broken"]["error"]
    assert rows["im0"]["status"] == rows["im1"]["status"] == "ok"
    assert json.loads((out / "summary.json").read_text())["failed"] == 1
    bad = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), f"ckpt={trained['run']}", "answer=maybe"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "answer='maybe'" in bad.stderr


def test_resume_skips_done_work_and_never_counts_partial_files(trained, tmp_path):
    run_dir, images = str(trained["run"]), _images(tmp_path / "in", 4)
    out = tmp_path / "out"
    first = predict(_cfg(f"ckpt={run_dir}", input=str(images), output=str(out), limit=2))
    assert first["predicted_now"] == 2
    second = predict(_cfg(f"ckpt={run_dir}", input=str(images), output=str(out)))
    assert (second["predicted_now"], second["skipped_done"], second["ok"]) == (2, 2, 4)
    # an interrupted run: one mask lost (killed before its rename), a torn journal line, a temporary file
    (out / "masks" / "im3.png").unlink()
    (out / "masks" / ".im3.png.tmp-1-2").write_bytes(b"partial")
    with (out / "progress" / "rank0.jsonl").open("a") as f:
        f.write('{"id": "im2", "status": "o')
    third = predict(_cfg(f"ckpt={run_dir}", input=str(images), output=str(out)))
    assert (third["predicted_now"], third["ok"]) == (1, 4)
    assert [r["id"] for r in _results(out)] == ["im0", "im1", "im2", "im3"]
    with pytest.raises(ConfigError, match="threshold differ"):
        predict(_cfg(f"ckpt={run_dir}", input=str(images), output=str(out), threshold=0.7))
    redo = predict(_cfg(f"ckpt={run_dir}", input=str(images), output=str(out), threshold=0.7, overwrite=True))
    assert (redo["predicted_now"], redo["skipped_done"]) == (4, 0)


@pytest.mark.slow
def test_kill9_mid_prediction_then_the_same_command_finishes_the_rest(trained, tmp_path):
    """A real interruption: predict.py killed (SIGKILL) after some inputs are journalled; re-running the same
    command predicts only the rest, and every mask equals an uninterrupted run's."""
    import time

    images, n = _images(tmp_path / "in", 24), 24
    reference = tmp_path / "reference"
    predict(_cfg(f"ckpt={trained['run']}", input=str(images), output=str(reference), batch_size=1))
    out = tmp_path / "out"
    cmd = [sys.executable, "predict.py", f"ckpt={trained['run']}", f"input={images}", f"output={out}"]
    cmd += ["batch_size=1", "num_workers=0", "writer_threads=1"]
    journal = out / "progress" / "rank0.jsonl"

    def journalled() -> int:
        return journal.read_text().count("\n") if journal.is_file() else 0

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while journalled() < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    _, err = proc.communicate(timeout=60)
    before = journalled()
    assert proc.returncode == -9 and 3 <= before < n, (proc.returncode, before, err[-2000:])
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["ok"] == n
        and summary["skipped_done"] >= before
        and summary["predicted_now"] == n - summary["skipped_done"]
    )
    assert [r["id"] for r in _results(out)] == [r["id"] for r in _results(reference)]
    ref_masks, masks = _masks(reference), _masks(out)
    assert set(masks) == set(ref_masks) and all(np.array_equal(masks[k], ref_masks[k]) for k in masks)


def test_scores_on_hand_made_masks():
    truth = np.zeros((20, 20), bool)
    truth[9:12, 2:18] = True  # a horizontal vessel, 3 px wide
    pred = truth.copy()
    pred[9:12, 10:18] = False  # half of it found
    s = score_masks(pred, truth)
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx(0.5) and s["dice"] == pytest.approx(2 / 3)
    assert s["iou"] == pytest.approx(0.5)
    assert 0.0 < s["cldice"] < 1.0 and cldice(truth, truth) == 1.0
    fov = np.zeros((20, 20), bool)
    fov[:, :10] = True  # only the found half is inside the field of view
    assert score_masks(pred, truth, fov)["dice"] == pytest.approx(1.0)
    empty = np.zeros((20, 20), bool)
    # both empty: every ratio 1, every boundary distance 0 (vseg.distances)
    assert score_masks(empty, empty) == {
        **{k: 1.0 for k in ("dice", "iou", "precision", "recall", "cldice")},
        "hd95": 0.0,
        "assd": 0.0,
    }


def test_finish_upsamples_merges_and_thresholds_each_input_at_its_own_size():
    """The batched finish step equals the per-input definition: K masks upsampled (via the SAM-2 side) to the
    input's size, union."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from vseg.inference.engine import Engine

    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(k, 16, 16, generator=g) for k in (1, 0, 2, 1, 3)]
    sizes = [(40, 30), (40, 30), (40, 30), (17, 23), (17, 23)]
    preds = Engine.finish(SimpleNamespace(threshold=0.5, sam_size=64), logits, sizes, [f"a{i}" for i in range(5)])
    assert [p.answer for p in preds] == [f"a{i}" for i in range(5)]
    assert [p.seg_tokens for p in preds] == [1, 0, 2, 1, 3]
    for lg, size, p in zip(logits, sizes, preds, strict=True):
        assert p.mask.shape == size and p.mask.dtype == bool
        if lg.shape[0] == 0:
            assert not p.mask.any() and np.isnan(p.mean_logit)
            continue
        up = F.interpolate(lg[:, None], size=(64, 64), mode="bilinear", align_corners=False)
        up = F.interpolate(up, size=size, mode="bilinear", align_corners=False)[:, 0]
        np.testing.assert_array_equal(p.mask, (up.sigmoid() > 0.5).any(0).numpy())
        assert p.mean_logit == pytest.approx(float(lg.mean()), rel=1e-5)
    assert 0 < preds[2].mask.mean() < 1 and (preds[2].mask != preds[0].mask).any()


def test_compile_gives_the_same_masks_and_the_summary_splits_the_loop_time(trained, tmp_path, capsys, monkeypatch):
    """compile=true (regional torch.compile of every repeated block) predicts what the eager model does.

    Traced by dynamo + AOTAutograd ("aot_eager"): inductor's C++ builds take minutes on two CPU cores; the
    GPU benchmark compares inductor's masks with eager ones (bench/predict.py).
    """
    import vseg.model.compile as C
    from vseg.model.compile import repeated_blocks

    monkeypatch.setattr(C, "BACKEND", "aot_eager")

    outs = {}
    for flag in (False, True):
        out = tmp_path / f"compile_{flag}"
        summary = predict(
            _cfg(f"ckpt={trained['run']}", input=str(trained["images"]), output=str(out), compile=flag, batch_size=3)
        )
        assert summary["ok"] == 3
        outs[flag] = out
        parts = {k: summary[k] for k in ("seconds_inputs", "seconds_model", "seconds_writing")}
        assert all(v >= 0 for v in parts.values()) and parts["seconds_model"] > 0, parts
        assert sum(parts.values()) <= summary["seconds_predict"] + 0.5, (parts, summary["seconds_predict"])
    assert "time in the prediction loop: waiting for inputs" in capsys.readouterr().out
    eager, compiled = _results(outs[False]), _results(outs[True])
    assert [r["mean_logit"] for r in compiled] == pytest.approx([r["mean_logit"] for r in eager], rel=1e-4, abs=1e-4)
    a, b = _masks(outs[False]), _masks(outs[True])
    assert all((a[k] == b[k]).mean() > 0.999 for k in a)
    # the compiled regions: SAM-2's Hiera blocks, the LLM's decoder layers (and the vision tower's, which the
    # tiny model has only one of), the mask decoder's two-way blocks; never bare torch.nn layers
    from vseg.artifacts import build_sa2va

    model, _ = build_sa2va(tiny_cfg().model, None)
    names = {type(b).__name__ for b in repeated_blocks(model)}
    assert {"Sam2MultiScaleBlock", "Qwen2DecoderLayer", "Sam2TwoWayAttentionBlock"} <= names, names
    assert not any(type(b).__module__.startswith("torch.nn") for b in repeated_blocks(model))


def test_compile_with_device_map_is_refused():
    with pytest.raises(ConfigError, match="compile=true"):
        from vseg.config import load_predict_config

        load_predict_config(_cfg("ckpt=random", compile=True, device_map="balanced"))
