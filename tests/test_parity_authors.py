"""Numeric parity with the authors' own Sa2VA code on identical random weights (InternVL family; InternLM2 LLM as
in Sa2VA-8B / 26B, and Qwen2 as in 1B / 4B / InternVL3, which their code takes from transformers).

Test-only and optional: the authors' files are read from a local mirror of bytedance/Sa2VA at test time
(`git show` into a temporary folder, imported from there, never copied into this repository); without the
mirror the tests skip and say why. Their modules are built at tiny sizes with random weights:

* `modeling_intern_vit.InternVisionModel` (the vision tower), `modeling_internlm2.InternLM2ForCausalLM` (or
  transformers' `Qwen2ForCausalLM`),
* `sam2.SAM2VideoPredictor` from their self-contained `sam2.py` (Hiera + FPN neck, prompt encoder, mask
  decoder, and small memory parts it requires),
* `mlp1` and `text_hidden_fcs` as their `Sa2VAChatModel.__init__` builds them (plain torch Sequentials),

and their state dicts are saved under the released key names. vseg loads that folder through `model.path`
(zero missing / unexpected keys: the layout is checked against their real module names, not vseg's writer).
Then, for one sample built by vseg's processor:

* **LM logits**: their `Sa2VAChatModel._llm_forward` (with their `extract_feature` / `pixel_shuffle`; the three
  methods are taken from their source with `ast` and run unchanged on a stand-in object holding their modules)
  vs vseg's decoder + LM head;
* **mask logits**: their last-layer hidden state at [SEG] -> their `text_hidden_fcs` -> their SAM-2
  `forward_image` / `track_step` on a first (conditioning) frame, as their `add_language_embd` runs it, vs
  vseg's `Sa2VA.forward` (low-res 32x32 logits, best-IoU of the three multimask outputs).

Two shims make their code run on transformers 5 (neither changes arithmetic): InternLM2's config is filled
attribute by attribute (transformers 5 drops attributes its remote `__init__` sets before `super().__init__`,
and maps `rope_scaling` to `rope_parameters`), and `timm` (for `DropPath`, unused at drop rate 0) is stubbed
while their ViT module imports. Their CUDA-only video driver (`init_state`, `propagate_in_video`) is not run.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path
from typing import Optional, Union  # names the extracted methods of the authors use

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from tests.conftest import tiny_cfg
from vseg.artifacts import build_sa2va
from vseg.model.grounding import mask_logits_at, masks_at
from vseg.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, SAM_MEAN_BF16, SAM_STD_BF16, normalise
from vseg.model.processor import Sa2VAProcessor
from vseg.model.tokenizer import IMG_CONTEXT_TOKEN, SEG_TOKEN, load_tokenizer, token_id

MIRROR = Path(os.environ.get("VSEG_SA2VA_MIRROR", "/work/.mirror/bytedance+Sa2VA/repo"))
SOURCE_DIR = "projects/sa2va/hf/models"
FILES = (
    "configuration_intern_vit.py",
    "modeling_intern_vit.py",
    "configuration_internlm2.py",
    "modeling_internlm2.py",
    "sam2.py",
    "modeling_sa2va_chat.py",
)
PACKAGE = "vseg_test_sa2va_authors"

VIT = dict(
    num_channels=3, patch_size=14, image_size=56, qkv_bias=True, hidden_size=32, num_attention_heads=2,
    intermediate_size=64, qk_normalization=False, num_hidden_layers=1, use_flash_attn=False, hidden_act="gelu",
    norm_type="layer_norm", layer_norm_eps=1e-6, dropout=0.0, drop_path_rate=0.0, attention_dropout=0.0,
    initializer_range=0.02, initializer_factor=0.1,
)  # fmt: skip
LLM = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=1024, rope_theta=1e6, bias=False, hidden_act="silu", rms_norm_eps=1e-6,
    initializer_range=0.02, use_cache=False, attn_implementation="eager", tie_word_embeddings=False,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
# vseg's tiny InternLM2 preset, with SAM-2's decoder at the sizes their `_build_sam_heads` hard-codes
# (8 heads, MLP 2048, IoU head 256) and Hiera's default head doubling per stage.
SAM_AND_VISION = [
    "model.tie_word_embeddings=false",
    "+model.vision.attention_bias=true",
    "model.sam2.vision_config.backbone_config.num_attention_heads_per_stage=[1,2,4,8]",
    "model.sam2.mask_decoder_config.num_attention_heads=8",
    "model.sam2.mask_decoder_config.mlp_dim=2048",
    "model.sam2.mask_decoder_config.iou_head_hidden_dim=256",
]
# LLM of the release -> (vseg overrides, official template)
LLMS = {
    "internlm2": (["model.text.model_type=llama", "model.template=internlm2_chat"], "internlm2_chat"),
    "qwen2": ([], "qwen_chat"),  # their Sa2VAChatModel holds transformers' own Qwen2ForCausalLM here
}


def _git_show(path: str) -> str | None:
    shown = subprocess.run(
        ["git", "-C", str(MIRROR), "show", f"HEAD:{path}"], capture_output=True, text=True, check=False
    )
    return shown.stdout if shown.returncode == 0 else None


@pytest.fixture(scope="module")
def authors(tmp_path_factory) -> types.SimpleNamespace:
    """The authors' modules, imported from a temporary copy of the mirror (skip when it is absent)."""
    if not MIRROR.is_dir():
        pytest.skip(f"no Sa2VA source mirror at {MIRROR} (set VSEG_SA2VA_MIRROR to a bytedance/Sa2VA git dir)")
    root = tmp_path_factory.mktemp("authors")
    package = root / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    sources = {}
    for name in FILES:
        text = _git_show(f"{SOURCE_DIR}/{name}")
        if text is None:
            pytest.skip(f"{MIRROR} has no {SOURCE_DIR}/{name}")
        sources[name] = text
        if name != "modeling_sa2va_chat.py":  # only read, for three methods: its imports need torchvision
            (package / name).write_text(text)

    class DropPath(nn.Module):  # timm's; their ViT only builds it for drop rates > 0
        def __init__(self, *args, **kwargs):
            super().__init__()

    stubs = {name: types.ModuleType(name) for name in ("timm", "timm.models", "timm.models.layers")}
    stubs["timm.models.layers"].DropPath = DropPath
    before = set(sys.modules)
    sys.path.insert(0, str(root))
    sys.modules.update({k: v for k, v in stubs.items() if k not in sys.modules})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mods = {
                n[:-3]: importlib.import_module(f"{PACKAGE}.{n[:-3]}") for n in FILES if n != "modeling_sa2va_chat.py"
            }
    except Exception as err:  # their code on this torch / transformers
        pytest.skip(f"the authors' modules do not import here: {err!r}")
    finally:
        sys.path.remove(str(root))
        for key in set(sys.modules) - before:
            if key in stubs or key.startswith(PACKAGE):
                del sys.modules[key]
    return types.SimpleNamespace(**mods, chat_methods=_methods(sources["modeling_sa2va_chat.py"]))


def _methods(source: str) -> dict[str, types.FunctionType]:
    """`pixel_shuffle`, `extract_feature`, `_llm_forward` of their `Sa2VAChatModel`, compiled from their source."""
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Sa2VAChatModel")
    namespace = {
        "torch": torch, "warnings": warnings, "Optional": Optional, "List": list, "Union": Union, "Tuple": tuple,
        "CausalLMOutputWithPast": CausalLMOutputWithPast, "CrossEntropyLoss": CrossEntropyLoss,
    }  # fmt: skip
    out = {}
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name in ("pixel_shuffle", "extract_feature", "_llm_forward"):
            exec(compile(textwrap.dedent(ast.get_source_segment(source, node)), "<authors>", "exec"), namespace)
            out[node.name] = namespace[node.name]
    assert set(out) == {"pixel_shuffle", "extract_feature", "_llm_forward"}
    return out


def _filled(config_cls: type, fields: dict) -> object:
    """A config of their class with every field set (transformers 5 drops what their __init__ sets early)."""
    cls = type(config_cls.__name__, (config_cls,), {"rope_scaling": None})  # no rope scaling, as released
    config = cls(**fields)
    for key, value in fields.items():
        setattr(config, key, value)
    return config


def _their_sam2(S, width: int = 32, memory: int = 16, size: int = 128) -> nn.Module:
    """Their SAM2VideoPredictor at `size` px, `width` channels and a `memory`-channel memory, with the flags of
    their `SAM2.__init__` (the release's)."""
    trunk = S.Hiera(
        embed_dim=16, num_heads=1, stages=[1, 1, 2, 1], global_att_blocks=[3],
        window_pos_embed_bkg_spatial_size=[4, 4], window_spec=[8, 4, 4, 4],
    )  # fmt: skip
    neck = S.FpnNeck(
        d_model=width,
        position_encoding=S.PositionEmbeddingSine(num_pos_feats=width, normalize=True, scale=None, temperature=10000),
        backbone_channel_list=[128, 64, 32, 16],
        fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )
    rope = dict(rope_theta=10000.0, feat_sizes=[8, 8], embedding_dim=width, num_heads=1, downsample_rate=1, dropout=0.0)
    layer = S.MemoryAttentionLayer(
        activation="relu", dim_feedforward=64, dropout=0.0, pos_enc_at_attn=False, d_model=width,
        pos_enc_at_cross_attn_queries=False, pos_enc_at_cross_attn_keys=True,
        self_attention=S.RoPEAttention(**rope),
        cross_attention=S.RoPEAttention(**rope, rope_k_repeat=True, kv_in_dim=memory),
    )  # fmt: skip
    memory_encoder = S.MemoryEncoder(
        out_dim=memory,
        in_dim=width,
        position_encoding=S.PositionEmbeddingSine(num_pos_feats=memory, normalize=True, scale=None, temperature=10000),
        mask_downsampler=S.MaskDownSampler(embed_dim=width, kernel_size=3, stride=2, padding=1),
        fuser=S.Fuser(layer=S.CXBlock(dim=width, kernel_size=7, padding=3, layer_scale_init_value=1e-6), num_layers=1),
    )
    return S.SAM2VideoPredictor(
        image_encoder=S.ImageEncoder(scalp=1, trunk=trunk, neck=neck),
        memory_attention=S.MemoryAttention(d_model=width, pos_enc_at_input=True, num_layers=1, layer=layer),
        memory_encoder=memory_encoder,
        num_maskmem=7, image_size=size, sigmoid_scale_for_mem_enc=20.0, sigmoid_bias_for_mem_enc=-10.0,
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


def _randomise(module: nn.Module, generator: torch.Generator) -> None:
    """Every tensor of the state dict random (norm scales around 1), so no mapping error hides behind a constant."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator) * 0.2
                scale = name.rsplit(".", 1)[-1] in ("weight", "g_weight") and "norm" in name
                tensor.copy_(noise + (1.0 if scale else 0.0))


def _their_llm(authors, kind: str, vocab: int) -> tuple[nn.Module, dict]:
    """Their language model (remote InternLM2, or transformers' Qwen2 as their code builds it) + its llm_config."""
    if kind == "internlm2":
        config = _filled(authors.configuration_internlm2.InternLM2Config, {**LLM, "vocab_size": vocab})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm = authors.modeling_internlm2.InternLM2ForCausalLM(config)
        fields = {k: v for k, v in LLM.items() if k != "attn_implementation"}
        return lm, {**fields, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2"}
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = {k: LLM[k] for k in LLM if k not in ("bias", "attn_implementation", "pad_token_id")}
    config = Qwen2Config(**fields, vocab_size=vocab)
    config._attn_implementation = "eager"
    return Qwen2ForCausalLM(config), {**fields, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}


@pytest.fixture(scope="module", params=sorted(LLMS))
def pair(authors, tmp_path_factory, request):
    """(their modules, vseg's model loaded from their weights in the released layout, tokenizer, vseg config)."""
    tokenizer = load_tokenizer(None)
    from vseg.model.tokenizer import ensure_special_tokens

    ensure_special_tokens(tokenizer)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    vit = authors.modeling_intern_vit.InternVisionModel(
        _filled(authors.configuration_intern_vit.InternVisionConfig, VIT)
    )
    lm, llm_config = _their_llm(authors, request.param, vocab)
    overrides, template = LLMS[request.param]
    vit_width, llm_width, scale = VIT["hidden_size"], LLM["hidden_size"], 2  # downsample_ratio 0.5
    mlp1 = nn.Sequential(
        nn.LayerNorm(vit_width * scale**2),
        nn.Linear(vit_width * scale**2, llm_width),
        nn.GELU(),
        nn.Linear(llm_width, llm_width),
    )
    sam = _their_sam2(authors.sam2)
    text_hidden_fcs = nn.Sequential(
        nn.Linear(llm_width, llm_width), nn.ReLU(inplace=True), nn.Linear(llm_width, sam.hidden_dim), nn.Dropout(0.0)
    )
    generator = torch.Generator().manual_seed(1)
    parts = {
        "vision_model.": vit,
        "mlp1.": mlp1,
        "language_model.": lm,
        "grounding_encoder.sam2_model.": sam,
        "text_hidden_fcs.": text_hidden_fcs,
    }
    tensors = {}
    for prefix, module in parts.items():
        _randomise(module, generator)
        module.eval()
        tensors.update({prefix + k: v.contiguous().clone() for k, v in module.state_dict().items()})

    folder = tmp_path_factory.mktemp("released")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["Sa2VAChatModel"],
        "model_type": "sa2va_chat",
        "template": template,
        "downsample_ratio": 0.5,
        "force_image_size": VIT["image_size"],
        "select_layer": -1,
        "ps_version": "v2",
        "vision_config": {**VIT, "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b"},
        "llm_config": {**llm_config, "vocab_size": vocab},
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(str(folder))

    cfg = tiny_cfg(overrides + SAM_AND_VISION)
    model_cfg = dataclasses.replace(cfg.model, path=str(folder))
    model, loaded_tokenizer = build_sa2va(model_cfg, None)  # raises on any missing / unexpected key
    model.eval()
    theirs = types.SimpleNamespace(vit=vit, lm=lm, mlp1=mlp1, sam=sam, text_hidden_fcs=text_hidden_fcs)
    return theirs, model, loaded_tokenizer, model_cfg


def _batch(model, tokenizer, model_cfg):
    processor = Sa2VAProcessor.for_model(model, tokenizer, model_cfg, 512)
    rng = np.random.default_rng(0)
    sample = processor.encode(
        rng.integers(0, 255, (70, 90, 3), dtype=np.uint8), "Please segment the blood vessels.", "It is [SEG]."
    )
    return processor.collate([sample])


def _their_chat_model(authors, theirs, img_context_id: int) -> object:
    """A stand-in `self` for their three Sa2VAChatModel methods, holding their modules."""
    cls = type("AuthorsSa2VAChatModel", (), dict(authors.chat_methods))
    chat = cls()
    chat.vision_model, chat.language_model, chat.mlp1 = theirs.vit, theirs.lm, theirs.mlp1
    chat.select_layer, chat.downsample_ratio, chat.ps_version = -1, 0.5, "v2"
    chat.img_context_token_id, chat._count = img_context_id, 0
    chat.config = types.SimpleNamespace(use_return_dict=True)
    return chat


def test_lm_and_mask_logits_match_the_authors_code(authors, pair):
    theirs, model, tokenizer, model_cfg = pair
    batch = _batch(model, tokenizer, model_cfg)
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    tiles = batch["mllm_inputs"]["pixel_values"]
    seg = input_ids[0] == token_id(tokenizer, SEG_TOKEN)
    assert int(seg.sum()) == 1 and int((input_ids == token_id(tokenizer, IMG_CONTEXT_TOKEN)).sum()) == 4

    with torch.no_grad():
        # ---- the authors' code path
        chat = _their_chat_model(authors, theirs, token_id(tokenizer, IMG_CONTEXT_TOKEN))
        out = chat._llm_forward(
            pixel_values=normalise(tiles, IMAGENET_MEAN, IMAGENET_STD),
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_flags=torch.ones(tiles.shape[0], dtype=torch.long),
            use_cache=False,
            output_hidden_states=True,
            return_dict=True,
        )
        their_logits = out.logits
        language_embd = theirs.text_hidden_fcs(out.hidden_states[-1][0][seg])  # (1, 32)
        sam = theirs.sam
        backbone = sam.forward_image(normalise(batch["sam_pixel_values"], SAM_MEAN_BF16, SAM_STD_BF16))
        _, feats, pos, sizes = sam._prepare_backbone_features(backbone)
        step = sam.track_step(
            frame_idx=0,
            is_init_cond_frame=True,
            current_vision_feats=feats,
            current_vision_pos_embeds=pos,
            feat_sizes=sizes,
            point_inputs=None,
            mask_inputs=None,
            output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
            num_frames=1,
            run_mem_encoder=False,
            language_embd=language_embd[None],
        )
        their_masks = step["pred_masks"][:, 0]  # (1, 32, 32) low-res logits, best IoU of 3
        # Their final mask: SAM-2 upsamples to its input side (128 here, 1024 released), then predict_forward
        # takes that to the image size; sigmoid > 0.5.
        height, width = batch["image_sizes"][0]
        their_final = torch.nn.functional.interpolate(
            step["pred_masks_high_res"].float(), size=(height, width), mode="bilinear", align_corners=False
        )[:, 0]

        # ---- vseg
        hidden = model.decoder_states(input_ids, attention_mask, batch["mllm_inputs"])
        my_logits = model.family.lm_head(model.base_mllm)(hidden)
        mine = model(input_ids, attention_mask, batch["labels"], batch["sam_pixel_values"], batch["mllm_inputs"])

    assert their_logits.abs().mean() > 1e-2 and their_masks.abs().mean() > 1e-2  # not trivially zero
    torch.testing.assert_close(my_logits, their_logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(mine.mask_logits, their_masks, atol=2e-5, rtol=1e-4)
    # Final masks at the image size: same logits to float32 noise, same pixels wherever the sign is decided.
    my_final = mask_logits_at(mine.mask_logits, (height, width), model.grounding.image_size)
    torch.testing.assert_close(my_final, their_final, atol=1e-4, rtol=1e-4)
    decided = their_final.abs() > 1e-3
    assert int(decided.sum()) > 0.99 * decided.numel()
    assert torch.equal(masks_at(mine.mask_logits, (height, width), model.grounding.image_size)[decided],
                       (their_final.sigmoid() > 0.5)[decided])  # fmt: skip


@pytest.mark.slow
def test_full_size_sam2_keys_of_the_release_map_one_to_one(authors):
    """SAM-2 Hiera-L exactly as their `SAM2()` builds it for every release (random weights): each key loads into
    vseg's full-size SAM-2 and its video memory with its shape (SAM 2.1-only parts excepted), and no tensor of
    vseg's grounding is left without a source."""
    from vseg.artifacts.sources import preset
    from vseg.model.build import build_grounding
    from vseg.model.families.internvl_release import InternVLLayout
    from vseg.model.families.layout import UNUSED_SAM2_PREFIXES

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = authors.sam2.SAM2()  # their init calls .item(): no meta device for it
    with torch.device("meta"):
        mine = build_grounding(preset("sa2va_1b"))
    assert mine.memory is not None
    native = {"grounding." + k: tuple(v.shape) for k, v in mine.state_dict().items()}
    layout = InternVLLayout("Qwen2ForCausalLM", 14, 2)
    loaded, dropped = set(), []
    for key, tensor in theirs.state_dict().items():
        full = "grounding_encoder." + key
        if layout.is_dropped(full):
            dropped.append(full)
            continue
        pieces = layout.to_native(full, tensor)
        assert pieces, f"{full} maps to nothing"
        for piece in pieces:
            want = native.get(piece.key)
            shape = tuple(piece.tensor.shape) if piece.row is None else (want[0], *piece.tensor.shape)
            assert want == shape and (piece.row is None or piece.row < want[0]), f"{full} -> {piece.key}"
            loaded.add(piece.key)
    assert sorted(set(native) - loaded) == []
    assert len(loaded) > 500
    assert all(k.startswith(UNUSED_SAM2_PREFIXES) for k in dropped), dropped
