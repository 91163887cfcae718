"""Video parity (issue 19): vseg's `Tracker` vs the authors' `SAM2VideoPredictor` on identical random weights.

Their `sam2.py` is imported from the local mirror as in `test_parity_authors.py` (never copied here). A small
SAM-2 (64-channel FPN: transformers' memory parts need multiples of 64, as Hiera-L's 256 is) is built by their
classes, randomised, saved under the released key names and loaded into vseg's grounding through the official
layout (`vseg.model.families.layout`, memory included). Then both track one random [SEG] embedding through a short
clip: theirs with `init_state` + `add_language_embd` on the key frames + `propagate_in_video`, exactly the calls
of their `language_embd_inference` (without its bf16 autocast, so both sides run in float32), and vseg's
`Tracker`. Low-res mask logits are compared on every frame.

Their driver hard-codes CUDA (`init_state` sets the devices to cuda, frames and memories are moved with
`.cuda()`); the CPU variant redirects those calls to the CPU for the test (`Tensor.cuda` returns the tensor,
the state's devices are set to cpu), which changes no arithmetic. The GPU variant (`-m gpu`) runs theirs as is
on CUDA, in true float32 (TF32 off for matmuls and convolutions on both sides, as on the CPU).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.test_parity_authors import MIRROR, _git_show, _randomise, _their_sam2
from vseg.model.families.internvl_release import InternVLLayout
from vseg.model.families.layout import OFFICIAL_SAM
from vseg.model.tracking import Tracker

from conftest import tiny_cfg

FRAMES, SIZE, KEYS = 7, 128, [0, 1, 2]


@pytest.fixture(scope="module")
def their_sam2(tmp_path_factory):
    import importlib
    import sys

    if not MIRROR.is_dir():
        pytest.skip(f"no Sa2VA source mirror at {MIRROR}")
    text = _git_show("projects/sa2va/hf/models/sam2.py")
    if text is None:
        pytest.skip("the mirror has no sam2.py")
    root = tmp_path_factory.mktemp("authors_video")
    (root / "vseg_video_authors").mkdir()
    (root / "vseg_video_authors" / "__init__.py").write_text("")
    (root / "vseg_video_authors" / "sam2.py").write_text(text)
    sys.path.insert(0, str(root))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module("vseg_video_authors.sam2")
    finally:
        sys.path.remove(str(root))
    return module


def _build_theirs(S) -> torch.nn.Module:
    """Their SAM2VideoPredictor at 128 px, 128 channels, one memory layer, with the release's flags."""
    # width 128 != the memory width 64, as in the release (256): their out_proj is a conv only then
    return _their_sam2(S, width=128, memory=64, size=SIZE)


VSEG_SAM = [
    "model.sam2.vision_config.fpn_hidden_size=128",
    "model.sam2.vision_config.backbone_config.num_attention_heads_per_stage=[1,2,4,8]",
    "model.sam2.prompt_encoder_config.hidden_size=128",
    "model.sam2.mask_decoder_config.hidden_size=128",
    "model.sam2.mask_decoder_config.num_attention_heads=8",
    "model.sam2.mask_decoder_config.mlp_dim=2048",
    "model.sam2.mask_decoder_config.iou_head_hidden_dim=256",
    "+model.sam2.memory={memory_attention_num_layers:1,memory_attention_feed_forward_hidden_size:64,"
    "memory_fuser_num_layers:1,memory_attention_rope_dropout:0.0,memory_attention_dropout:0.0}",
]


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif("not torch.cuda.is_available()")])],
)
def test_tracking_matches_the_authors_video_predictor(their_sam2, monkeypatch, device):
    from vseg.model.build import build_grounding
    from vseg.model.preprocess import SAM_MEAN_BF16, SAM_STD_BF16, normalise

    torch.manual_seed(0)
    theirs = _build_theirs(their_sam2)
    _randomise(theirs, torch.Generator().manual_seed(5))
    theirs.eval()
    layout = InternVLLayout("Qwen2ForCausalLM", 4, 2)
    native = {}
    for key, tensor in theirs.state_dict().items():
        full = OFFICIAL_SAM + key
        if layout.is_dropped(full):
            continue
        for piece in layout.to_native(full, tensor):
            if piece.row is None:
                native[piece.key] = piece.tensor
            else:
                native.setdefault(piece.key, []).append((piece.row, piece.tensor))
    for key, rows in list(native.items()):
        if isinstance(rows, list):
            native[key] = torch.stack([t for _, t in sorted(rows, key=lambda r: r[0])])
    grounding = build_grounding(tiny_cfg(VSEG_SAM).model).eval()
    state = {k.removeprefix("grounding."): v for k, v in native.items()}
    missing, unexpected = grounding.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in m or "inv_freq" in m for m in missing), missing

    generator = torch.Generator().manual_seed(9)
    frames = torch.randint(0, 255, (FRAMES, 3, SIZE, SIZE), generator=generator, dtype=torch.uint8)
    embedding = torch.randn(1, 128, generator=generator)

    device = torch.device(device)
    if device.type == "cpu":  # their driver's .cuda() calls, redirected (see the module docstring)
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    else:  # float32 as on the CPU: TF32 would round both sides differently past the tolerance
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    theirs.to(device)
    grounding.to(device)
    with torch.no_grad():
        state = theirs.init_state(normalise(frames, SAM_MEAN_BF16, SAM_STD_BF16).to(device))
        state["device"] = state["storage_device"] = device
        for k in KEYS:
            theirs.add_language_embd(state, k, 100, embedding.to(device)[None], inference=True)
        their_logits = {t: m[:, 0].float() for t, _, m in theirs.propagate_in_video(state)}
        mine = dict(Tracker(grounding, embedding.to(device), FRAMES, KEYS, lambda i: frames[i]))
    assert sorted(mine) == sorted(their_logits) == list(range(FRAMES))
    for t in range(FRAMES):
        # theirs: at video resolution (= SAM size); mine: low-res, upsampled the same way
        up = torch.nn.functional.interpolate(mine[t][:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        assert their_logits[t].abs().mean() > 1e-2
        # float32 noise only: logits of ~100 agree to ~1e-5 relative (memories pass through bfloat16 on both sides)
        scale = float(their_logits[t].abs().mean())
        torch.testing.assert_close(up[:, 0], their_logits[t], atol=2e-5 * scale, rtol=1e-4, msg=f"frame {t}")
        decided = their_logits[t].abs() > 1e-3 * scale
        assert torch.equal((up[:, 0] > 0)[decided], (their_logits[t] > 0)[decided]), f"frame {t}: mask pixels differ"
