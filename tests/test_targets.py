"""Several targets per image on the tiny model: the targets= forms, one batched pass that gives the masks of
separate passes, predict.py with a two-category COCO file (masks per target, per-target scores and distances in
mm), resume, and validation's per-target Dice and distances."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from vseg.cli import compose
from vseg.config import ConfigError, DataConfig, load_config
from vseg.data.records import load_sample
from vseg.data.sources import read_records
from vseg.data.synthetic import generate_vessels
from vseg.distances import surface_distances
from vseg.inference.predictor import Predictor
from vseg.inference.scoring import score_masks
from vseg.inference.targets import parse_targets
from vseg.predict import run as predict
from vseg.training.run import run as train

from conftest import compose_cfg

TARGETS = {"artery": "Please segment the arteries.", "vein": "Please segment the veins."}


def _coco(root: Path, n: int = 3, vein_everywhere: bool = False) -> Path:
    """n synthetic angiograms of different sizes; category 1 (artery) on each, 2 (vein) on all but the last."""
    root.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        image, _ = generate_vessels(seed=300 + i, size=64 + 16 * i, style="angiogram")
        Image.fromarray(image).save(root / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "height": image.shape[0], "width": image.shape[1]})
        box = [4, 4, 30 + i, 4, 30 + i, 12, 4, 12]
        annotations.append({"id": 10 + i, "image_id": i + 1, "category_id": 1, "segmentation": [box]})
        if vein_everywhere or i < n - 1:
            box = [10, 20, 40, 20, 40, 40 + i, 10, 40 + i]
            annotations.append({"id": 20 + i, "image_id": i + 1, "category_id": 2, "segmentation": [box]})
    categories = [{"id": 1, "name": "artery"}, {"id": 2, "name": "vein"}]
    path = root / "coco.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture(scope="module")
def predictor():
    return Predictor.load("random", model="tiny", device="cpu")


# ---------------------------------------------------------------- the targets= forms
def test_target_forms(tmp_path):
    assert parse_targets(None) is None
    assert parse_targets(OmegaConf.create(TARGETS)) == TARGETS
    data = DataConfig(object_prompts=["Find the {phrase}."])
    assert parse_targets(["artery", "vein"], data) == {"artery": "Find the artery.", "vein": "Find the vein."}
    assert parse_targets({"artery": None}) == {"artery": "Please segment the artery in this image."}
    file = tmp_path / "targets.yaml"
    file.write_text("artery: Please segment the arteries.\nvein: Please segment the veins.\n")
    assert list(parse_targets(str(file))) == ["artery", "vein"]  # order kept: it is the overlay's colour order


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"../x": "a"}, "a target name is 1-64 letters"),
        ({"Artery": "a", "artery": "b"}, "name the same target"),
        ({"artery": 3}, "the prompt must be text"),
        ({"artery": "It is [SEG]."}, "belongs in the answer"),
        ({}, "non-empty mapping"),
        ("no/such/targets.yaml", "no such file"),
    ],
)
def test_bad_targets_say_what_to_fix(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_targets(value)


def test_prompt_and_targets_together_is_a_config_error(tmp_path):
    cfg = OmegaConf.merge(
        compose("predict", ["ckpt=random", "model=tiny"]),
        {"input": str(tmp_path), "output": str(tmp_path / "o"), "prompt": "x", "targets": TARGETS},
    )
    with pytest.raises(ConfigError, match="prompt= and targets= both given"):
        predict(cfg)


# ---------------------------------------------------------------- one batched pass == separate passes
def test_one_batched_pass_gives_the_masks_of_separate_passes(predictor, tmp_path):
    images = [generate_vessels(seed=400 + i, size=56 + 24 * i, style="fundus")[0] for i in range(3)]
    together = predictor.predict(images, targets=TARGETS, batch_size=2)  # 2 images x 2 targets = 4 rows a pass
    assert len(together) == 3 and all(list(per) == list(TARGETS) for per in together)
    for name, prompt in TARGETS.items():
        alone = predictor.predict(images, prompts=prompt, batch_size=1)
        for image, per_image, single in zip(images, together, alone, strict=True):
            assert per_image[name].mask.shape == image.shape[:2]
            assert per_image[name].mean_logit == pytest.approx(single.mean_logit, rel=1e-4, abs=1e-5)
            assert np.array_equal(per_image[name].mask, single.mask)
    # the targets differ only in the question, so their masks come from different [SEG] states
    assert together[0]["artery"].mean_logit != together[0]["vein"].mean_logit
    with pytest.raises(ValueError, match="not both"):
        predictor.predict(images, prompts="x", targets=TARGETS)


# ---------------------------------------------------------------- predict.py with a two-category COCO file
def test_coco_with_two_categories_gives_two_masks_and_per_target_scores(tmp_path):
    annotations = _coco(tmp_path / "data")
    out = tmp_path / "out"
    overrides = [
        "ckpt=random",
        "model=tiny",
        "data=coco",
        f"data.annotations={annotations}",
        "data.pixel_spacing=[0.5,0.25]",
        "num_workers=0",
        f"output={out}",
    ]
    summary = predict(compose("predict", [*overrides, "targets={artery: 'Please segment the arteries.', vein: null}"]))
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert summary["ok"] == summary["images"] == len(records) == 3  # one record per image, not per target
    sources = {r.id: r for r in read_records(DataConfig(source="coco", annotations=str(annotations)))}
    expected: dict[str, list[dict]] = {"artery": [], "vein": []}
    for record in records:
        sample = load_sample(sources[record["id"]], None)
        assert set(record["targets"]) == {"artery", "vein"}
        assert record["targets"]["vein"]["prompt"] == "Please segment the vein in this image."
        assert (out / record["overlay"]).is_file()
        for name, entry in record["targets"].items():
            assert entry["mask"] == f"masks/{name}/{record['id']}.png"
            mask = np.asarray(Image.open(out / entry["mask"])) > 0
            assert mask.shape == sample.image.shape[:2]
            truth = np.zeros(mask.shape, bool)
            for plane, phrase in zip(sample.masks, sample.phrases, strict=True):
                truth |= plane if phrase == name else False
            scores = score_masks(mask, truth, None, (0.5, 0.25))  # each target against its own truth
            assert {k: entry[k] for k in scores} == pytest.approx(scores)
            expected[name].append(scores)
    assert not (out / "masks" / "im0.png").exists()
    for name, entries in expected.items():
        target = summary["targets"][name]
        assert target["with_ground_truth"] == 3
        assert target["dice"] == pytest.approx(np.mean([e["dice"] for e in entries]))
        assert target["cldice"] == pytest.approx(np.mean([e["cldice"] for e in entries]))
        defined = [e for e in entries if e["hd95"] is not None]
        assert target["hd95_undefined"] == len(entries) - len(defined)
        if defined:
            assert target["hd95"] == pytest.approx(np.mean([e["hd95"] for e in defined]))
            assert target["assd_mm"] == pytest.approx(np.mean([e["assd_mm"] for e in defined]))
    # im2 has no vein: its vein truth is empty, so its distance is undefined unless the prediction is empty too
    im2 = next(r for r in records if r["id"] == "im2")["targets"]["vein"]
    predicted_vein = bool((np.asarray(Image.open(out / im2["mask"])) > 0).any())
    assert (im2["hd95"] is None) == predicted_vein and (im2["hd95"] == 0.0) == (not predicted_vein)
    assert summary["with_ground_truth"] == 6  # every (image, target) pair: the overall means run over those
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["targets"]["artery"]["hd95_mm"] == pytest.approx(summary["targets"]["artery"]["hd95_mm"])

    # the same command resumes (nothing left to do); other targets in the same folder are refused
    again = predict(compose("predict", [*overrides, "targets={artery: 'Please segment the arteries.', vein: null}"]))
    assert again["skipped_done"] == 3 and again["predicted_now"] == 0
    with pytest.raises(ConfigError, match="targets"):
        predict(compose("predict", [*overrides, "targets=[artery]"]))


def test_file_inputs_with_targets_have_no_truth_and_no_scores(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(generate_vessels(seed=5, size=72, style="angiogram")[0]).save(folder / "a.png")
    out = tmp_path / "out"
    summary = predict(
        compose("predict", ["ckpt=random", "model=tiny", f"input={folder}", f"output={out}", "targets=[artery,vein]"])
    )
    assert summary["ok"] == 1 and summary["targets"]["artery"]["with_ground_truth"] == 0
    assert summary["targets"]["vein"]["dice"] is None and "hd95" not in summary["targets"]["vein"]
    assert (out / "masks" / "artery" / "a.png").is_file() and (out / "masks" / "vein" / "a.png").is_file()
    overlay = Image.open(out / "overlays" / "a.png")
    assert overlay.width == 72 and overlay.height > 72  # the legend band sits below the image
    listing = tmp_path / "list.txt"
    listing.write_text("in/a.png\tin/a.png\n")  # a masks column: one truth per image, not per target
    with pytest.raises(ConfigError, match="cannot be split into targets"):
        predict(compose("predict", ["ckpt=random", "model=tiny", f"input={listing}", "targets=[artery]"]))


# ---------------------------------------------------------------- validation in training
@pytest.mark.slow
def test_validation_logs_dice_per_target_and_distances_in_mm(tmp_path):
    annotations = _coco(tmp_path / "data", n=4, vein_everywhere=True)
    cfg = load_config(
        compose_cfg(
            [
                "data=coco",
                f"data.annotations={annotations}",
                "data.objects=per_object",
                "data.image_size=64",
                "data.pixel_spacing=0.5",
                "data.split.val_fraction=0.25",
                "data.batch_size=2",
                "data.val_batch_size=2",
                "data.num_workers=0",
                "data.max_length=512",
                f"run_dir={tmp_path / 'run'}",
                "trainer.max_steps=1",
                "trainer.val_check_interval=1",
                "trainer.num_sanity_val_steps=0",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
            ]
        )
    )
    metrics = train(cfg).metrics
    for key in ("val/dice/artery", "val/dice/vein", "val/hd95_undefined", "val/assd_undefined"):
        assert key in metrics, sorted(metrics)
    # one val image, two objects: the mean Dice is the mean of the two targets'
    assert metrics["val/dice"] == pytest.approx((metrics["val/dice/artery"] + metrics["val/dice/vein"]) / 2, abs=1e-5)
    defined = 2 - metrics["val/hd95_undefined"]
    if defined:
        # image_size 64 from 64x64 originals (val image im*): the mm values are the pixel ones x the scaled size
        assert metrics["val/hd95_mm"] / metrics["val/hd95"] == pytest.approx(0.5 * _scale(annotations, cfg), rel=1e-4)


def _scale(annotations: Path, cfg) -> float:
    """The factor data.pixel_spacing is multiplied by at the training size, for the (single) val image."""
    from vseg.data.dataset import split_records

    records = read_records(cfg.data)
    _, val = split_records(records, cfg.data.split, cfg.data.seed)
    height = load_sample(val[0], None).image.shape[0]
    return height / cfg.data.image_size


def test_surface_distances_are_symmetric():
    a = np.zeros((32, 32), bool)
    a[5:10, 5:20] = True
    b = np.zeros((32, 32), bool)
    b[8:14, 9:25] = True
    assert surface_distances(a, b) == pytest.approx(surface_distances(b, a))


@pytest.mark.slow
def test_data_parallel_targets_equal_one_process(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    annotations = _coco(tmp_path / "data")
    args = ["ckpt=random", "model=tiny", "data=coco", f"data.annotations={annotations}", "targets=[artery,vein]"]
    predict(compose("predict", [*args, f"output={tmp_path / 'one'}", "num_workers=0"]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), *args, f"output={tmp_path / 'two'}", "devices=2"]
        + ["accelerator=cpu", "batch_size=1", "num_workers=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / o / "summary.json").read_text()) for o in ("one", "two"))
    assert two["ok"] == 3 and "data-parallel x2" in two["placement"]
    for name in ("artery", "vein"):
        for i in range(3):
            a, b = (np.asarray(Image.open(tmp_path / o / "masks" / name / f"im{i}.png")) for o in ("one", "two"))
            assert np.array_equal(a, b)
        assert two["targets"][name]["dice"] == pytest.approx(one["targets"][name]["dice"])


def test_generate_answers_each_target(predictor):
    images = [generate_vessels(seed=7, size=64, style="fundus")[0]]
    out = predictor.predict(images, targets=TARGETS, answer="generate")
    assert list(out[0]) == list(TARGETS)
    for name, p in out[0].items():
        assert isinstance(p.answer, str) and p.mask.shape == (64, 64)
        assert p.seg_tokens == p.answer.count("[SEG]")  # a mask per generated [SEG] (none: an empty mask)
        assert p.seg_tokens or not p.mask.any(), name
