"""Loading checkpoint folders (`model.path`): the official Sa2VA key layout, cross-checked by hand, and clear errors.

The official folders here are written by the official writer from tiny vseg models; the mapping itself is
checked independently of that writer: InternLM2's `wqkv` and InternViT's `qkv` are built with the formulas
of the authors' modeling code, and SAM-2 names are compared with a hand-listed sample of the original names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import random_batch, tiny_cfg
from vseg.artifacts import build_sa2va
from vseg.artifacts.folders import CheckpointError, write_official_folder
from vseg.model.families.internvl_release import InternVLLayout, fuse_internlm2_wqkv, split_internlm2_wqkv
from vseg.model.processor import Sa2VAProcessor

INTERNLM2 = [
    "model.text.model_type=llama",
    "model.template=internlm2_chat",
    "model.tie_word_embeddings=false",
    "+model.vision.attention_bias=true",
]
VARIANTS = {"qwen2": [], "internlm2": INTERNLM2}


def model_outputs(model, tokenizer, model_cfg, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """LM logits at every position and the mask logits of a fixed two-sample batch."""
    processor = Sa2VAProcessor.for_model(model, tokenizer, model_cfg, 256)
    batch = random_batch(processor, seed=seed)
    model.eval()
    with torch.no_grad():
        hidden = model.decoder_states(batch["input_ids"], batch["attention_mask"], batch["mllm_inputs"])
        logits = model.family.lm_head(model.base_mllm)(hidden)
        out = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            batch["sam_pixel_values"],
            batch["mllm_inputs"],
        )
    return logits, out.mask_logits


def _tiny(variant: str, seed: int = 0):
    cfg = tiny_cfg(VARIANTS[variant]).model
    torch.manual_seed(seed)
    model, tokenizer = build_sa2va(cfg, None)
    return cfg, model, tokenizer


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def official_folder(request, tmp_path_factory):
    """(variant, cfg, model, tokenizer, folder): a tiny model and its official-layout folder in 3+ shards."""
    cfg, model, tokenizer = _tiny(request.param)
    folder = tmp_path_factory.mktemp(f"official_{request.param}")
    write_official_folder(model, cfg, tokenizer, folder, "float32", max_shard_bytes=400_000)
    return request.param, cfg, model, tokenizer, folder


def _load(cfg, folder: Path, dtype: str = "float32"):
    return build_sa2va(dataclasses.replace(cfg, path=str(folder), dtype=dtype), None)


# ---- the mapping, checked against the authors' formulas -------------------------------------------------------


def test_internlm2_wqkv_split_follows_the_official_gqa_interleaving():
    heads, kv_heads, head_dim, hidden = 8, 2, 3, 5
    groups = heads // kv_heads
    q = torch.randn(heads * head_dim, hidden)
    k = torch.randn(kv_heads * head_dim, hidden)
    v = torch.randn(kv_heads * head_dim, hidden)
    # modeling_internlm2: wqkv output viewed as (kv_heads, groups + 2, head_dim): for each KV head, its
    # `groups` query heads, then its key head, then its value head; query heads are numbered h * groups + g.
    rows = []
    for h in range(kv_heads):
        for g in range(groups):
            j = h * groups + g
            rows.append(q[j * head_dim : (j + 1) * head_dim])
        rows.append(k[h * head_dim : (h + 1) * head_dim])
        rows.append(v[h * head_dim : (h + 1) * head_dim])
    wqkv = torch.cat(rows)
    q2, k2, v2 = split_internlm2_wqkv(wqkv, heads, kv_heads)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
    assert torch.equal(fuse_internlm2_wqkv(q, k, v, heads, kv_heads), wqkv)
    # Same attention inputs: the official forward's rearrange vs the Llama projections.
    x = torch.randn(7, hidden)
    fused = (x @ wqkv.T).reshape(7, kv_heads, groups + 2, head_dim)
    official_q = fused[:, :, :groups].reshape(7, heads, head_dim)
    assert torch.allclose(official_q, (x @ q2.T).reshape(7, heads, head_dim), atol=1e-6)
    assert torch.allclose(fused[:, :, -2], (x @ k2.T).reshape(7, kv_heads, head_dim), atol=1e-6)
    layout = InternVLLayout("InternLM2ForCausalLM", heads, kv_heads)
    pieces = layout.to_native("language_model.model.layers.3.attention.wqkv.weight", wqkv)
    assert [p.key for p in pieces] == [
        f"mllm.model.language_model.layers.3.self_attn.{n}_proj.weight" for n in ("q", "k", "v")
    ]


def test_internvit_qkv_split_follows_the_official_reshape():
    dim, heads = 12, 3
    qkv_w, qkv_b = torch.randn(3 * dim, dim), torch.randn(3 * dim)
    x = torch.randn(5, dim)
    # modeling_intern_vit: qkv(x).reshape(B, N, 3, heads, head_dim); index 0 / 1 / 2 = q / k / v.
    official = (x @ qkv_w.T + qkv_b).reshape(5, 3, heads, dim // heads)
    layout = InternVLLayout("Qwen2ForCausalLM", 4, 2)
    weights = {p.key: p.tensor for p in layout.to_native("vision_model.encoder.layers.0.attn.qkv.weight", qkv_w)}
    biases = {p.key: p.tensor for p in layout.to_native("vision_model.encoder.layers.0.attn.qkv.bias", qkv_b)}
    stem = "mllm.model.vision_tower.encoder.layer.0.attention."
    for index, name in enumerate("qkv"):
        mine = x @ weights[f"{stem}{name}_proj.weight"].T + biases[f"{stem}{name}_proj.bias"]
        assert torch.allclose(mine.reshape(5, heads, dim // heads), official[:, index], atol=1e-6)


# Original SAM-2 / Sa2VA names (facebookresearch/sam2 modules as held by Sa2VA's grounding_encoder) and the
# transformers Sam2Model names they become (prefix grounding.sam.).
SAM2_NAMES = {
    "image_encoder.trunk.pos_embed": "vision_encoder.backbone.pos_embed",
    "image_encoder.trunk.pos_embed_window": "vision_encoder.backbone.pos_embed_window",
    "image_encoder.trunk.patch_embed.proj.weight": "vision_encoder.backbone.patch_embed.projection.weight",
    "image_encoder.trunk.blocks.0.norm1.weight": "vision_encoder.backbone.blocks.0.layer_norm1.weight",
    "image_encoder.trunk.blocks.0.attn.qkv.weight": "vision_encoder.backbone.blocks.0.attn.qkv.weight",
    "image_encoder.trunk.blocks.2.proj.bias": "vision_encoder.backbone.blocks.2.proj.bias",
    "image_encoder.trunk.blocks.1.mlp.layers.1.bias": "vision_encoder.backbone.blocks.1.mlp.proj_out.bias",
    "image_encoder.neck.convs.3.conv.weight": "vision_encoder.neck.convs.3.weight",
    "no_mem_embed": "no_memory_embedding",
    "sam_prompt_encoder.not_a_point_embed.weight": "prompt_encoder.not_a_point_embed.weight",
    "sam_prompt_encoder.no_mask_embed.weight": "prompt_encoder.no_mask_embed.weight",
    "sam_prompt_encoder.mask_downscaling.4.bias": "prompt_encoder.mask_embed.layer_norm2.bias",
    "sam_prompt_encoder.mask_downscaling.6.weight": "prompt_encoder.mask_embed.conv3.weight",
    "sam_mask_decoder.transformer.layers.0.self_attn.out_proj.weight": (
        "mask_decoder.transformer.layers.0.self_attn.o_proj.weight"
    ),
    "sam_mask_decoder.transformer.layers.1.cross_attn_image_to_token.k_proj.bias": (
        "mask_decoder.transformer.layers.1.cross_attn_image_to_token.k_proj.bias"
    ),
    "sam_mask_decoder.transformer.layers.0.norm4.weight": "mask_decoder.transformer.layers.0.layer_norm4.weight",
    "sam_mask_decoder.transformer.layers.1.mlp.layers.0.weight": "mask_decoder.transformer.layers.1.mlp.proj_in.weight",
    "sam_mask_decoder.transformer.final_attn_token_to_image.out_proj.bias": (
        "mask_decoder.transformer.final_attn_token_to_image.o_proj.bias"
    ),
    "sam_mask_decoder.transformer.norm_final_attn.weight": "mask_decoder.transformer.layer_norm_final_attn.weight",
    "sam_mask_decoder.output_upscaling.1.weight": "mask_decoder.upscale_layer_norm.weight",
    "sam_mask_decoder.output_upscaling.3.bias": "mask_decoder.upscale_conv2.bias",
    "sam_mask_decoder.output_hypernetworks_mlps.2.layers.1.weight": (
        "mask_decoder.output_hypernetworks_mlps.2.layers.0.weight"
    ),
    "sam_mask_decoder.iou_prediction_head.layers.2.bias": "mask_decoder.iou_prediction_head.proj_out.bias",
    "sam_mask_decoder.pred_obj_score_head.layers.0.weight": "mask_decoder.pred_obj_score_head.proj_in.weight",
    "sam_mask_decoder.obj_score_token.weight": "mask_decoder.obj_score_token.weight",
    "sam_mask_decoder.conv_s1.weight": "mask_decoder.conv_s1.weight",
}
# SAM-2 video memory (issue 19: kept for tracking, under transformers' Sam2VideoModel names)
MEMORY_SAM2_NAMES = {
    "memory_encoder.fuser.layers.0.g_weight": "memory_encoder.memory_fuser.layers.0.scale",
    "memory_encoder.fuser.layers.1.pwconv2.bias": "memory_encoder.memory_fuser.layers.1.pointwise_conv2.bias",
    "memory_encoder.mask_downsampler.encoder.9.weight": "memory_encoder.mask_downsampler.layers.3.conv.weight",
    "memory_encoder.mask_downsampler.encoder.10.bias": "memory_encoder.mask_downsampler.layers.3.layer_norm.bias",
    "memory_encoder.mask_downsampler.encoder.12.weight": "memory_encoder.mask_downsampler.final_conv.weight",
    "memory_encoder.pix_feat_proj.weight": "memory_encoder.feature_projection.weight",
    "memory_encoder.out_proj.bias": "memory_encoder.projection.bias",
    "memory_attention.layers.0.cross_attn_image.k_proj.weight": "memory_attention.layers.0.cross_attn_image.k_proj.weight",
    "memory_attention.layers.2.self_attn.out_proj.weight": "memory_attention.layers.2.self_attn.o_proj.weight",
    "memory_attention.layers.3.norm2.bias": "memory_attention.layers.3.layer_norm2.bias",
    "memory_attention.layers.1.linear1.weight": "memory_attention.layers.1.linear1.weight",
    "memory_attention.norm.weight": "memory_attention.layer_norm.weight",
    "maskmem_tpos_enc": "memory_temporal_positional_encoding",
    "no_mem_pos_enc": "no_memory_positional_encoding",
    "no_obj_ptr": "no_object_pointer",
    "obj_ptr_proj.layers.0.weight": "object_pointer_proj.proj_in.weight",
    "obj_ptr_proj.layers.1.bias": "object_pointer_proj.layers.0.bias",
    "obj_ptr_proj.layers.2.weight": "object_pointer_proj.proj_out.weight",
    "mask_downsample.weight": "mask_downsample.weight",
}
UNUSED_SAM2_NAMES = ["obj_ptr_tpos_proj.weight", "no_obj_embed_spatial"]  # SAM 2.1 only


def test_sam2_renames_match_a_hand_listed_sample():
    layout = InternVLLayout("Qwen2ForCausalLM", 4, 2)
    t = torch.zeros(1)
    for original, native in SAM2_NAMES.items():
        pieces = layout.to_native(f"grounding_encoder.sam2_model.{original}", t)
        assert [p.key for p in pieces] == [f"grounding.sam.{native}"], original
        back = dict(layout.to_official({f"grounding.sam.{native}": t}, tied=False))
        assert list(back) == [f"grounding_encoder.sam2_model.{original}"]
    for original, native in MEMORY_SAM2_NAMES.items():
        key = f"grounding_encoder.sam2_model.{original}"
        assert not layout.is_dropped(key)
        assert [p.key for p in layout.to_native(key, t)] == [f"grounding.memory.{native}"], original
        assert list(dict(layout.to_official({f"grounding.memory.{native}": t}, tied=False))) == [key]
    for original in UNUSED_SAM2_NAMES:
        assert layout.is_dropped(f"grounding_encoder.sam2_model.{original}")
    layout.with_memory = False  # a SAM-2 too narrow for memory (the tiny presets) drops it on import
    for original in MEMORY_SAM2_NAMES:
        assert layout.is_dropped(f"grounding_encoder.sam2_model.{original}")
    # Four point-embedding rows -> one matrix; one random-Fourier matrix -> both positional buffers.
    rows = layout.to_native("grounding_encoder.sam2_model.sam_prompt_encoder.point_embeddings.2.weight", t)
    assert (rows[0].key, rows[0].row) == ("grounding.sam.prompt_encoder.point_embed.weight", 2)
    gaussian = "grounding_encoder.sam2_model.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    assert {p.key for p in layout.to_native(gaussian, t)} == {
        "grounding.sam.prompt_encoder.shared_embedding.positional_embedding",
        "grounding.sam.shared_image_embedding.positional_embedding",
    }
    assert layout.to_native("grounding_encoder.sam2_model.something_new.weight", t) is None


# ---- loading official folders -----------------------------------------------------------------------------------


def test_official_folder_loads_with_identical_outputs(official_folder):
    variant, cfg, model, tokenizer, folder = official_folder
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 3
    expected = {"vision_model.encoder.layers.0.attn.qkv.weight", "mlp1.1.weight", "text_hidden_fcs.2.weight"}
    expected |= {"grounding_encoder.sam2_model.sam_mask_decoder.transformer.layers.0.norm1.weight"}
    if variant == "internlm2":
        expected |= {"language_model.model.layers.1.attention.wqkv.weight", "language_model.output.weight"}
        expected |= {
            "language_model.model.tok_embeddings.weight",
            "language_model.model.layers.0.feed_forward.w3.weight",
        }
    else:
        expected |= {"language_model.model.layers.1.self_attn.q_proj.bias", "language_model.lm_head.weight"}
    assert expected <= set(index)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "sa2va_chat" and config["template"] == cfg.template
    loaded, loaded_tokenizer = _load(cfg, folder)
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert len(loaded_tokenizer) == len(tokenizer)  # tokens found in the folder, nothing added or resized
    for a, b in zip(model_outputs(model, tokenizer, cfg), model_outputs(loaded, loaded_tokenizer, cfg), strict=True):
        assert torch.equal(a, b)


def test_load_casts_to_the_model_dtype(official_folder):
    _, cfg, model, _, folder = official_folder
    loaded, _ = _load(cfg, folder, dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    w = "mllm.model.multi_modal_projector.linear_1.weight"
    assert torch.equal(loaded.state_dict()[w], model.state_dict()[w].bfloat16())


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    target.mkdir()
    for f in folder.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def _edit_shard(folder: Path, key: str, edit) -> None:
    """Rewrites the shard holding `key`: edit(tensors) changes the dict in place; the index follows."""
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = folder / index["weight_map"][key]
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update(dict.fromkeys(tensors, shard.name))
    index_file.write_text(json.dumps(index))


def test_sam2_memory_tensors_are_dropped_and_logged(official_folder, tmp_path, caplog):
    _, cfg, model, _, folder = official_folder
    folder = _copy(folder, tmp_path)
    memory = "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.g_weight"
    attention = "grounding_encoder.sam2_model.memory_attention.layers.0.linear1.weight"

    def add(tensors):
        tensors[memory] = torch.ones(4)
        tensors[attention] = torch.ones(8, 4)

    _edit_shard(folder, "mlp1.1.weight", add)
    with caplog.at_level(logging.INFO, logger="vseg.artifacts.folders"):
        loaded, _ = _load(cfg, folder)
    assert "dropped 1 tensors under grounding_encoder.sam2_model.memory_encoder." in caplog.text
    assert "dropped 1 tensors under grounding_encoder.sam2_model.memory_attention." in caplog.text
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing_shard", r"shard model-00002-of-\d+\.safetensors is missing"),
        ("wrong_shape", r"mismatched shapes:\n\s+mlp1\.1\.weight: checkpoint \(3, 7\)"),
        ("extra_key", r"unexpected .*\n\s+language_model\.model\.extra\.weight"),
        ("missing_key", r"missing .*\n\s+mllm\.model\.multi_modal_projector\.linear_1\.weight"),
        ("no_config", r"no config\.json"),
        ("unknown_model", r"model_type='llava'.* is not a checkpoint vseg can load"),
        ("wrong_llm", r"llm_config\.architectures=\['MistralForCausalLM'\] is not supported"),
    ],
)
def test_broken_folders_fail_with_a_clear_message(official_folder, tmp_path, damage, message):
    variant, cfg, _, _, folder = official_folder
    if variant != "qwen2":
        pytest.skip("one layout is enough for the error paths")
    folder = _copy(folder, tmp_path)
    config_file = folder / "config.json"
    if damage == "missing_shard":
        (folder / next(f for f in sorted(p.name for p in folder.glob("model-00002-*")))).unlink()
    elif damage == "wrong_shape":
        _edit_shard(folder, "mlp1.1.weight", lambda t: t.update({"mlp1.1.weight": torch.zeros(3, 7)}))
    elif damage == "extra_key":
        _edit_shard(folder, "mlp1.1.weight", lambda t: t.update({"language_model.model.extra.weight": torch.zeros(2)}))
    elif damage == "missing_key":
        _edit_shard(folder, "mlp1.1.weight", lambda t: t.pop("mlp1.1.weight"))
    elif damage == "no_config":
        config_file.unlink()
    elif damage == "unknown_model":
        config_file.write_text(json.dumps({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}))
    elif damage == "wrong_llm":
        config = json.loads(config_file.read_text())
        config["llm_config"]["architectures"] = ["MistralForCausalLM"]
        config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        _load(cfg, folder)


def test_folder_of_another_family_is_refused(official_folder):
    variant, _, _, _, folder = official_folder
    other = tiny_cfg(VARIANTS["internlm2" if variant == "qwen2" else "qwen2"]).model
    with pytest.raises(CheckpointError, match=r"does not match model=tiny .*\n.*model\.template: preset"):
        _load(other, folder)
    bigger = tiny_cfg(VARIANTS[variant] + ["model.text.hidden_size=128"]).model
    with pytest.raises(CheckpointError, match=r"model\.text\.hidden_size: preset 128, checkpoint 64"):
        _load(bigger, folder)


def test_loading_reads_one_tensor_at_a_time(official_folder, monkeypatch):
    """Nothing loads whole shards: every tensor comes from safe_open.get_tensor, each at most once."""
    _, cfg, _, _, folder = official_folder
    import vseg.artifacts.folders.load as checkpoint  # where tensors are read

    reads: list[str] = []

    class CountingOpen:
        def __init__(self, *args, **kwargs):
            self.inner = safe_open(*args, **kwargs)

        def __enter__(self):
            handle = self.inner.__enter__()

            class Handle:
                def keys(self):
                    return handle.keys()

                def get_slice(self, key):
                    return handle.get_slice(key)

                def get_tensor(self, key):
                    reads.append(key)
                    return handle.get_tensor(key)

            return Handle()

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(checkpoint, "safe_open", CountingOpen)
    _load(cfg, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(reads) == sorted(index)


def test_plain_base_mllm_gets_the_tokens_and_grown_rows(tmp_path, caplog):
    """An InternVL base (no [SEG], no SAM-2): tokens added, embedding grown on CPU with the mean row."""
    from vseg.model.tokenizer import SA2VA_ADDED_TOKENS, token_id

    cfg, model, tokenizer = _tiny("qwen2")
    folder = tmp_path / "base"
    folder.mkdir()
    write_official_folder(model, cfg, tokenizer, folder, "float32", max_shard_bytes=1 << 30)
    # Take the Sa2VA tokens out of the tokenizer (later ids move down) and their rows out of the embedding.
    removed = sorted(token_id(tokenizer, t) for t in SA2VA_ADDED_TOKENS)
    assert removed == list(range(removed[0], removed[0] + 5))

    def remap(i: int) -> int:
        return i if i < removed[0] else i - 5

    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["added_tokens"] = [
        dict(t, id=remap(t["id"])) for t in spec["added_tokens"] if t["content"] not in SA2VA_ADDED_TOKENS
    ]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    if "added_tokens_decoder" in tc:
        tc["added_tokens_decoder"] = {
            str(remap(int(k))): v
            for k, v in tc["added_tokens_decoder"].items()
            if v["content"] not in SA2VA_ADDED_TOKENS
        }
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(tc.get(key), list):
            tc[key] = [t for t in tc[key] if t not in SA2VA_ADDED_TOKENS]
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    rows = len(tokenizer)
    keep = [i for i in range(rows) if i not in removed]
    heads = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
    weights = {
        k: (v[keep].clone() if k in heads else v)
        for k, v in load_file(str(folder / "model.safetensors")).items()
        if not k.startswith(("grounding_encoder.", "text_hidden_fcs."))
    }
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="internvl_chat", architectures=["InternVLChatModel"])
    config["llm_config"]["vocab_size"] = rows - 5
    (folder / "config.json").write_text(json.dumps(config))

    with caplog.at_level(logging.INFO, logger="vseg.artifacts.folders"):
        loaded, loaded_tokenizer = _load(cfg, folder)
    assert "embed_tokens.weight: 404 -> 409 rows" in caplog.text
    assert [token_id(loaded_tokenizer, t) for t in SA2VA_ADDED_TOKENS] == list(range(rows - 5, rows))
    old = model.base_mllm.get_input_embeddings().weight[keep]
    new = loaded.base_mllm.get_input_embeddings().weight
    assert new.shape[0] == rows and torch.equal(new[: rows - 5], old)
    torch.testing.assert_close(new[rows - 5 :], old.mean(0).expand(5, -1))
    assert loaded.base_mllm.lm_head.weight is new  # still tied
    assert not any(p.device.type == "meta" for p in loaded.parameters())  # SAM-2 + text_hidden_fcs built real


@pytest.mark.parametrize("theta_at_top", [True, False])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers5_rope_parameters_are_read(variant, theta_at_top, tmp_path):
    """A folder saved by transformers 5 keeps its rope in `rope_parameters` next to `rope_scaling: null`:
    dynamic x2 (Sa2VA-8B / 26B) is read as such, not as default rope (which conflicts with the preset)."""
    rope = "{rope_type:dynamic,factor:2.0,rope_theta:1000000.0}"
    cfg = tiny_cfg([*VARIANTS[variant], f"+model.text.rope_parameters={rope}"]).model
    torch.manual_seed(0)
    model, tokenizer = build_sa2va(cfg, None)
    write_official_folder(model, cfg, tokenizer, tmp_path, "float32", max_shard_bytes=1 << 30)
    config = json.loads((tmp_path / "config.json").read_text())
    llm = config["llm_config"]
    assert llm.pop("rope_scaling") == {"type": "dynamic", "factor": 2.0}  # the remote-code spelling, as released
    if not theta_at_top:
        llm.pop("rope_theta")
    llm.update(rope_scaling=None, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6})
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, _ = _load(cfg, tmp_path)
    rope_read = loaded.base_mllm.config.text_config.rope_parameters
    assert (rope_read["rope_type"], rope_read["factor"], rope_read["rope_theta"]) == ("dynamic", 2.0, 1e6)
    # The folder's rope is read, not the preset's: a default-rope preset is refused, naming the field.
    with pytest.raises(CheckpointError, match="rope"):
        _load(tiny_cfg(VARIANTS[variant]).model, tmp_path)


def test_predict_dtype_float32_reads_the_files_float32_values(official_folder):
    """`predict.py dtype=float32` with a bfloat16 preset: the weights are read in float32, not rounded first."""
    from vseg.artifacts.sources import ModelSource
    from vseg.inference.predictor import Predictor

    _, cfg, model, _, folder = official_folder
    source = ModelSource("official", folder, dataclasses.replace(cfg, path=str(folder), dtype="bfloat16"))
    predictor = Predictor.from_source(source, device="cpu", dtype="float32")
    assert predictor.dtype == "float32"
    loaded = predictor.model
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert {t.dtype for t in theirs.values() if t.is_floating_point()} == {torch.float32}
    assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == []
