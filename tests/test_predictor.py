"""`Predictor`, the object under every front door: loads once, predicts arrays, PIL images and paths, and gives
exactly the masks predict.py writes for the same images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.test_predict import _cfg, _images, _masks, trained  # noqa: F401  (module fixture reused)
from vseg import Predictor
from vseg.inference.inputs import InputError
from vseg.predict import run as predict


@pytest.fixture(scope="module")
def predictor(trained):  # noqa: F811
    return Predictor.load(trained["run"], device="cpu", dtype="float32")


def test_predict_takes_arrays_pil_images_and_paths_and_equals_predict_py(trained, predictor):  # noqa: F811
    out = trained["root"] / "via_predict_py"
    predict(_cfg(f"ckpt={trained['run']}", input=str(trained["images"]), output=str(out), dtype="float32"))
    written = _masks(out)
    paths = sorted(trained["images"].glob("*.png"))
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    pils = [Image.open(p) for p in paths]
    for inputs in (paths, [str(p) for p in paths], arrays, pils):
        results = predictor.predict(inputs, batch_size=2)
        assert len(results) == len(paths)
        for path, array, result in zip(paths, arrays, results, strict=True):
            assert result.mask.shape == array.shape[:2] and result.mask.dtype == bool
            assert result.answer == predictor.answer_text and result.seg_tokens == 1
            np.testing.assert_array_equal(result.mask, written[path.stem] > 0)
    single = predictor.predict(arrays[0])
    assert len(single) == 1 and np.array_equal(single[0].mask, written[paths[0].stem] > 0)


def test_prompts_one_for_all_or_one_per_image(trained, predictor):  # noqa: F811
    paths = sorted(trained["images"].glob("*.png"))[:2]
    same = predictor.predict(paths, prompts="Segment the vessels.")
    each = predictor.predict(paths, prompts=["Segment the vessels.", "Segment the vessels."])
    for a, b in zip(same, each, strict=True):
        assert np.array_equal(a.mask, b.mask)
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        predictor.predict(paths, prompts=["a", "b", "c"])


def test_generate_mode_answers_in_text(trained, predictor):  # noqa: F811
    path = sorted(trained["images"].glob("*.png"))[0]
    result = predictor.predict(path, answer="generate")[0]
    assert isinstance(result.answer, str) and result.mask.shape == Image.open(path).size[::-1]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("/nonexistent/scan.png", "scan.png"),
        (np.zeros((8, 8), dtype=np.float32), "HxWx3 uint8"),
    ],
)
def test_unreadable_inputs_name_the_input(predictor, bad, message):
    with pytest.raises(InputError, match=message):
        predictor.predict([bad])


def test_bad_load_options_are_config_errors():
    from vseg.config import ConfigError

    with pytest.raises(ConfigError, match="dtype='float8'"):
        Predictor.load("random", model="tiny", device="cpu", dtype="float8")
    with pytest.raises(ConfigError, match="needs model="):
        Predictor.load("random", device="cpu")
