"""Video parity (issue 19): vseg's `Tracker` vs the authors' `SAM2VideoPredictor` on identical random weights.

Their `sam2.py` is imported from the local mirror as in `test_parity_authors.py` (never copied here). A small
SAM-2 (64-channel FPN: transformers' memory parts need multiples of 64, as Hiera-L's 256 is) is built by their
classes, randomised, saved under the released key names and loaded into vseg's grounding through the official
layout (`vseg.artifacts.official`, memory included). Then both track one random [SEG] embedding through a short
clip: theirs with `init_state` + `add_language_embd` on the key frames + `propagate_in_video`, exactly the calls
of their `language_embd_inference` (without its bf16 autocast, so both sides run in float32), and vseg's
`Tracker`. Low-res mask logits are compared on every frame.

Their driver hard-codes CUDA (`init_state` sets the devices to cuda, frames and memories are moved with
`.cuda()`); on a CPU-only machine those calls are redirected to the CPU for the test (`Tensor.cuda` returns the
tensor, the state's devices are set to cpu), which changes no arithmetic. With a GPU the test runs theirs as is.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.test_parity_authors import MIRROR, _git_show, _randomise
from vseg.artifacts import official
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
    d = 128  # != the memory width 64, as in the release (256): their out_proj is a conv only then
    trunk = S.Hiera(
        embed_dim=16, num_heads=1, stages=[1, 1, 2, 1], global_att_blocks=[3],
        window_pos_embed_bkg_spatial_size=[4, 4], window_spec=[8, 4, 4, 4],
    )  # fmt: skip
    neck = S.FpnNeck(
        d_model=d,
        position_encoding=S.PositionEmbeddingSine(num_pos_feats=d, normalize=True, scale=None, temperature=10000),
        backbone_channel_list=[128, 64, 32, 16],
        fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )
    rope = dict(rope_theta=10000.0, feat_sizes=[8, 8], embedding_dim=d, num_heads=1, downsample_rate=1, dropout=0.0)
    layer = S.MemoryAttentionLayer(
        activation="relu", dim_feedforward=64, dropout=0.0, pos_enc_at_attn=False, d_model=d,
        pos_enc_at_cross_attn_queries=False, pos_enc_at_cross_attn_keys=True,
        self_attention=S.RoPEAttention(**rope),
        cross_attention=S.RoPEAttention(**rope, rope_k_repeat=True, kv_in_dim=64),
    )  # fmt: skip
    memory_encoder = S.MemoryEncoder(
        out_dim=64,
        in_dim=d,
        position_encoding=S.PositionEmbeddingSine(num_pos_feats=64, normalize=True, scale=None, temperature=10000),
        mask_downsampler=S.MaskDownSampler(embed_dim=d, kernel_size=3, stride=2, padding=1),
        fuser=S.Fuser(layer=S.CXBlock(dim=d, kernel_size=7, padding=3, layer_scale_init_value=1e-6), num_layers=1),
    )
    return S.SAM2VideoPredictor(
        image_encoder=S.ImageEncoder(scalp=1, trunk=trunk, neck=neck),
        memory_attention=S.MemoryAttention(d_model=d, pos_enc_at_input=True, num_layers=1, layer=layer),
        memory_encoder=memory_encoder,
        num_maskmem=7, image_size=SIZE, sigmoid_scale_for_mem_enc=20.0, sigmoid_bias_for_mem_enc=-10.0,
        use_mask_input_as_output_without_sam=True, directly_add_no_mem_embed=True, use_high_res_features_in_sam=True,
        multimask_output_in_sam=True, iou_prediction_use_sigmoid=True, use_obj_ptrs_in_encoder=True,
        add_tpos_enc_to_obj_ptrs=False, only_obj_ptrs_in_the_past_for_eval=True, pred_obj_scores=True,
        pred_obj_scores_mlp=True, fixed_no_obj_ptr=True, multimask_output_for_tracking=True,
        use_multimask_token_for_obj_ptr=True, multimask_min_pt_num=0, multimask_max_pt_num=1,
        use_mlp_for_obj_ptr_proj=True, compile_image_encoder=False,
        sam_mask_decoder_extra_args={
            "dynamic_multimask_via_stability": True,
            "dynamic_multimask_stability_delta": 0.05,
            "dynamic_multimask_stability_thresh": 0.98,
        },
    )  # fmt: skip


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


def test_tracking_matches_the_authors_video_predictor(their_sam2, monkeypatch):
    from vseg.model.build import build_grounding
    from vseg.model.preprocess import SAM_MEAN_BF16, SAM_STD_BF16, normalise

    torch.manual_seed(0)
    theirs = _build_theirs(their_sam2)
    _randomise(theirs, torch.Generator().manual_seed(5))
    theirs.eval()
    layout = official.InternVLLayout("Qwen2ForCausalLM", 4, 2)
    native = {}
    for key, tensor in theirs.state_dict().items():
        full = official.OFFICIAL_SAM + key
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

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # their driver's .cuda() calls, redirected (see the module docstring)
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
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
