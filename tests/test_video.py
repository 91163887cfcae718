"""Runs (issue 19): reading video / DICOM / stacks / frame folders, SAM-2 tracking, predict.py outputs for runs.

Every input file is built here (PyAV encodes the mp4, pydicom writes the DICOMs); the model is the tiny preset
widened to a 64-channel SAM-2 (transformers' memory parts need multiples of 64) with one memory layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vseg.cli import compose
from vseg.data.dicom import read_dicom, to_uint8
from vseg.data.io import DataFileError, read_image
from vseg.data.runs import is_run_file, natural_key, read_run, read_truth
from vseg.inference.run_outputs import run_inputs
from vseg.model.tracking import key_frame_indices

from conftest import tiny_cfg

VIDEO_MODEL = [
    "model.sam2.vision_config.fpn_hidden_size=64",
    "model.sam2.prompt_encoder_config.hidden_size=64",
    "model.sam2.mask_decoder_config.hidden_size=64",
    "+model.sam2.memory={memory_attention_num_layers:1,memory_attention_feed_forward_hidden_size:64,"
    "memory_fuser_num_layers:1}",
]


def _frames(n: int = 5, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth moving blobs (a lossy codec keeps them; random noise it would not)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for i in range(n):
        blob = np.exp(-((x - w / 3 - 2 * i - seed) ** 2 + (y - h / 2) ** 2) / (2 * (h / 5) ** 2))
        grey = 40 + 180 * blob
        out.append(np.stack([grey, grey * 0.8 + 20, 255 - grey], axis=-1).clip(0, 255).astype(np.uint8))
    return np.stack(out)


def _mp4(path: Path, frames: np.ndarray, fps: int = 12) -> Path:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return path


def _dicom(path: Path, pixels: np.ndarray, **fields) -> Path:
    """A minimal XA DICOM (uncompressed, little endian) of (T, H, W) or (H, W) uint16 pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "XA"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, fields.pop("photometric", "MONOCHROME2")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in fields.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


# ---- reading ---------------------------------------------------------------------------------------------------


def test_video_gif_tiff_and_frame_folder_read_as_runs(tmp_path):
    frames = _frames()
    run = read_run(_mp4(tmp_path / "clip.mp4", frames))
    assert run.frames.shape == frames.shape and run.fps == pytest.approx(12)
    assert np.abs(run.frames.astype(int) - frames).mean() < 8  # lossy codec, same content
    gif = tmp_path / "loop.gif"
    Image.fromarray(frames[0]).save(
        gif, save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]], duration=50
    )
    tif = tmp_path / "stack.tif"
    Image.fromarray(frames[0]).save(tif, save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]])
    assert read_run(gif).frames.shape[0] == 5 and read_run(gif).fps == pytest.approx(20)
    assert np.array_equal(read_run(tif).frames, frames)  # lossless
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (10, 2, 1):  # natural order: f1, f2, f10
        Image.fromarray(frames[i % 5]).save(folder / f"f{i}.png")
    run = read_run(folder)
    assert run.names == ["f1", "f2", "f10"] and np.array_equal(run.frames[2], frames[0])
    assert sorted(["f10", "f2"], key=natural_key) == ["f2", "f10"]
    assert all(is_run_file(p) for p in (tmp_path / "clip.mp4", gif, tif))
    Image.fromarray(frames[0]).save(tmp_path / "still.gif")
    assert not is_run_file(tmp_path / "still.gif")


def test_bad_run_files_name_the_file(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    with pytest.raises(DataFileError, match="broken.mp4"):
        read_run(broken)
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(_frames(1)[0]).save(folder / "a.png")
    Image.fromarray(_frames(1, 20, 20)[0]).save(folder / "b.png")
    with pytest.raises(DataFileError, match="frame 1 is 20x20 but frame 0 is 64x48"):
        read_run(folder)
    with pytest.raises(DataFileError, match="not a readable DICOM"):
        read_dicom(_write(tmp_path / "junk.dcm", b"junk" * 100))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_multiframe_dicom_windows_inverts_and_carries_timing(tmp_path):
    grey = np.linspace(0, 4095, 3 * 8 * 10).reshape(3, 8, 10).round().astype(np.uint16)
    path = _dicom(
        tmp_path / "run.dcm", grey, WindowCenter=2048, WindowWidth=1024, FrameTime=66.7,
        ImagerPixelSpacing=[0.2, 0.25], photometric="MONOCHROME1",
    )  # fmt: skip
    frames, meta = read_dicom(path)
    assert frames.shape == (3, 8, 10, 3) and meta.frames == 3
    assert meta.frame_time_ms == pytest.approx(66.7) and meta.fps == pytest.approx(1000 / 66.7)
    assert meta.pixel_spacing_mm == (0.2, 0.25) and meta.window == (2048, 1024)
    expected = 255 - to_uint8(grey, (2048, 1024))  # MONOCHROME1: high values dark
    assert np.array_equal(frames[..., 0], expected)
    assert frames[0, 0, 0, 0] == 255 and frames[-1, -1, -1, 0] == 0  # below / above the window, inverted
    run = read_run(path)
    assert run.meta["pixel_spacing_mm"] == [0.2, 0.25] and is_run_file(path)
    # no window: min-max over the whole run; single frame: an image (predict, folders data source)
    single = _dicom(tmp_path / "one.dcm", grey[1] + 100)
    image = read_image(single)
    assert image.shape == (8, 10, 3) and image.min() == 0 and image.max() == 255 and not is_run_file(single)
    with pytest.raises(DataFileError, match="holds 3 frames"):
        read_image(path)


def test_truth_masks_match_frames_by_name(tmp_path):
    run = read_run(_mp4(tmp_path / "clip.mp4", _frames()))
    truth = tmp_path / "truth"
    truth.mkdir()
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(truth / "00002.png")
    assert list(read_truth(truth, run)) == [2]
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(truth / "00003.png")
    with pytest.raises(DataFileError, match="00003.png is 4x4"):
        read_truth(truth, run)


def test_run_inputs_discovery(tmp_path):
    _mp4(tmp_path / "a.mp4", _frames())
    assert run_inputs(str(tmp_path / "a.mp4"), "auto") == [("a", tmp_path / "a.mp4")]
    assert run_inputs(str(tmp_path), "auto")[0][0] == "a"
    assert run_inputs(str(tmp_path), "false") is None
    Image.fromarray(_frames(1)[0]).save(tmp_path / "still.png")
    with pytest.raises(Exception, match="both runs"):
        run_inputs(str(tmp_path), "auto")
    assert run_inputs(str(tmp_path), "true") == [(tmp_path.name, tmp_path)]


def test_key_frames():
    assert key_frame_indices(60, 5, "first") == [0, 1, 2, 3, 4]
    assert key_frame_indices(60, 5, "uniform") == [0, 15, 30, 44, 59]
    assert key_frame_indices(3, 5, "uniform") == [0, 1, 2]


# ---- the model ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_model():
    from vseg.artifacts import build_sa2va

    torch.manual_seed(0)
    cfg = tiny_cfg(VIDEO_MODEL)
    model, tokenizer = build_sa2va(cfg.model, None)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # memory parts start at zeros / defaults: random, so nothing hides behind a constant
        for name, p in model.grounding.memory.named_parameters():
            p.copy_(
                torch.randn(p.shape, generator=generator) * 0.2 + (1.0 if "norm" in name and "weight" in name else 0)
            )
    return cfg, model.eval(), tokenizer


def test_key_frames_equal_the_image_path_and_memory_changes_later_frames(video_model):
    from vseg.model.tracking import Tracker

    _, model, _ = video_model
    grounding = model.grounding
    frames = torch.randint(0, 255, (4, 3, 128, 128), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    prompts = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = dict(Tracker(grounding, prompts, 4, [0], lambda i: frames[i]))
        image = grounding.decode(grounding.encode(frames[[0, 0]]), prompts, torch.tensor([0, 0]))
        alone = grounding.decode(grounding.encode(frames[[2, 2]]), prompts, torch.tensor([0, 0]))
    assert sorted(out) == [0, 1, 2, 3] and out[3].shape == (2, 32, 32)
    torch.testing.assert_close(out[0], image.float())  # a key frame is exactly an image prediction
    # tracked frames read the memory: not the image prediction of the same frame (relative: tiny logits)
    assert (out[2] - alone.float()).abs().mean() > 0.1 * alone.abs().mean() > 0


def test_a_model_without_memory_refuses_runs_with_a_clear_message():
    from vseg.artifacts import build_sa2va
    from vseg.model.tracking import Tracker

    model, _ = build_sa2va(tiny_cfg().model, None)  # 32-channel SAM-2: too narrow for memory
    assert model.grounding.memory is None
    with pytest.raises(ValueError, match="no SAM-2 memory weights"):
        Tracker(model.grounding, torch.zeros(1, 32), 3, [0], lambda i: None)


def test_predict_py_on_a_video_with_truth_writes_frames_overlay_and_resumes(tmp_path, capsys):
    from vseg.predict import run as predict

    frames = _frames(4, 40, 56)
    clip = _mp4(tmp_path / "clip.mp4", frames)
    truth = tmp_path / "truth"
    truth.mkdir()
    Image.fromarray((frames[1, :, :, 0] > 128).astype(np.uint8) * 255).save(truth / "00001.png")
    broken = tmp_path / "runs"
    broken.mkdir()
    (broken / "bad.mp4").write_bytes(b"junk")
    clip.rename(broken / "clip.mp4")
    out = tmp_path / "out"
    overrides = ["ckpt=random", "model=tiny", *VIDEO_MODEL, f"input={broken}", f"output={out}", f"truth={truth}"]
    cfg = compose("predict", [*overrides, "key_frames=2", "overlay_format=gif"])
    summary = predict(cfg)
    assert summary["runs"] == 2 and summary["ok"] == 1 and summary["failed"] == 1
    assert "bad.mp4" in summary["failures"][0]["path"]
    assert summary["frames"] == 4 and summary["scored_frames"] == 0  # truth of a single run only without subfolder
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    run = next(r for r in records if r["kind"] == "run" and r["status"] == "ok")
    assert run["key_frames"] == [0, 1] and (out / run["overlay"]).is_file()
    frames_out = [r for r in records if r["kind"] == "frame"]
    assert [f["name"] for f in frames_out] == ["00000", "00001", "00002", "00003"]
    mask = np.asarray(Image.open(out / frames_out[2]["mask"]))
    assert mask.shape == (40, 56) and set(np.unique(mask)) <= {0, 255}
    # resume: the finished run is skipped, the broken one retried
    summary = predict(compose("predict", [*overrides, "key_frames=2", "overlay_format=gif"]))
    assert summary["skipped_done"] == 1 and summary["ok"] == 1
    # a single run with truth beside it: its frames are scored
    single = compose("predict", [*overrides[:-3], f"input={broken / 'clip.mp4'}", f"output={tmp_path / 'o2'}",
                                 f"truth={truth}", "overlays=false"])  # fmt: skip
    summary = predict(single)
    assert summary["scored_frames"] == 1 and 0.0 <= summary["dice"] <= 1.0
