"""Released Qwen-VL Sa2VA folders (`Sa2VAChatModelQwen`: Qwen2.5-VL and Qwen3-VL) load natively and write back.

The authors' wrapper holds transformers' Qwen-VL model as `self.model`, so its keys are `model.model.visual.*`,
`model.model.language_model.*`, `model.lm_head.*`, next to `grounding_encoder.sam2_model.*` and
`text_hidden_fcs.*`; its config.json is the transformers Qwen-VL config with model_type `sa2va_chat`,
`architectures: [Sa2VAChatModelQwen]` and `template` (projects/sa2va/hf/models_qwen*/ and tools/convert_to_hf.py
of bytedance/Sa2VA). The tiny folders here are written by vseg's official writer; the key prefixes and the config
fields are asserted against those facts, not against the writer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import tiny_cfg
from tests.test_checkpoint import model_outputs
from vseg.artifacts import build_sa2va
from vseg.artifacts.folders import CheckpointError, write_official_folder
from vseg.model.families.qwen_vl_release import QwenVLLayout
from vseg.model.tokenizer import IMAGE_TOKENS, SA2VA_ADDED_TOKENS, build_tiny_tokenizer

# The Qwen2.5-VL folder ties its head (the base 3B does); the Qwen3-VL one unties it, as the authors'
# converter writes every Qwen release (`tie_word_embeddings = False`).
FAMILIES = {
    "qwen2_5_vl": ["model=tiny_qwen2_5vl"],
    "qwen3_vl": ["model=tiny_qwen3vl", "model.tie_word_embeddings=false"],
}
OFFICIAL_PREFIXES = {
    "model.model.visual.",
    "model.model.language_model.",
    "model.lm_head.",
    "grounding_encoder.sam2_model.",
    "text_hidden_fcs.",
}


def _prefix(key: str) -> str:
    return next(p for p in sorted(OFFICIAL_PREFIXES, key=len, reverse=True) if key.startswith(p))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def qwen_folder(request, tmp_path_factory):
    """(family, cfg, model, tokenizer, folder): a tiny Qwen-VL Sa2VA and its official folder in several shards."""
    cfg = tiny_cfg(FAMILIES[request.param]).model
    torch.manual_seed(0)
    model, tokenizer = build_sa2va(cfg, None)
    folder = tmp_path_factory.mktemp(f"official_{request.param}")
    write_official_folder(model, cfg, tokenizer, folder, "float32", max_shard_bytes=300_000)
    return request.param, cfg, model, tokenizer, folder


def _load(cfg, folder: Path):
    return build_sa2va(dataclasses.replace(cfg, path=str(folder)), None)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def test_official_layout_and_config(qwen_folder):
    family, cfg, model, _, folder = qwen_folder
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 3
    assert {_prefix(k) for k in index} == OFFICIAL_PREFIXES
    assert "model.model.language_model.embed_tokens.weight" in index and "model.lm_head.weight" in index
    assert "grounding_encoder.sam2_model.sam_prompt_encoder.point_embeddings.3.weight" in index
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "sa2va_chat" and config["architectures"] == ["Sa2VAChatModelQwen"]
    assert config["template"] == cfg.template == "qwen_chat"
    assert config["auto_map"]["AutoModel"] == "modeling_sa2va_qwen.Sa2VAChatModelQwen"
    assert config["vision_config"]["model_type"].startswith(family)
    text = config["text_config"]
    assert text["vocab_size"] == model.base_mllm.get_input_embeddings().weight.shape[0]
    assert config["tie_word_embeddings"] is text["tie_word_embeddings"] is cfg.tie_word_embeddings
    # transformers 4.5x (the authors' code) reads rope_theta / rope_scaling, 5.x rope_parameters.
    assert text["rope_scaling"]["mrope_section"] == text["rope_parameters"]["mrope_section"]
    assert text["rope_theta"] == text["rope_parameters"]["rope_theta"]
    assert (folder / "preprocessor_config.json").is_file()


def test_official_folder_loads_with_zero_missing_keys_and_identical_outputs(qwen_folder):
    _, cfg, model, tokenizer, folder = qwen_folder
    loaded, loaded_tokenizer = _load(cfg, folder)  # raises listing any missing / unexpected key
    assert len(loaded_tokenizer) == len(tokenizer)
    assert loaded.base_mllm.config.tie_word_embeddings == cfg.tie_word_embeddings
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs)
    assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == []
    for a, b in zip(model_outputs(model, tokenizer, cfg), model_outputs(loaded, loaded_tokenizer, cfg), strict=True):
        assert torch.equal(a, b)  # LM logits, then mask logits


def test_export_import_export_round_trips(qwen_folder, tmp_path):
    _, cfg, _, _, folder = qwen_folder
    loaded, loaded_tokenizer = _load(cfg, folder)
    again = tmp_path / "again"
    again.mkdir()
    write_official_folder(loaded, cfg, loaded_tokenizer, again, "float32", max_shard_bytes=1 << 30)
    first, second = _tensors(folder), _tensors(again)
    assert set(first) == set(second)
    assert [k for k in first if not torch.equal(first[k], second[k])] == []
    assert json.loads((again / "config.json").read_text()) == json.loads((folder / "config.json").read_text())


def test_pre_452_transformers_names_load_too(qwen_folder, tmp_path):
    """A wrapper saved with transformers < 4.52 (Qwen2.5-VL era): `model.visual.*`, `model.model.*` decoder."""
    _, cfg, model, _, folder = qwen_folder
    legacy = {}
    for key, value in _tensors(folder).items():
        key = key.replace("model.model.visual.", "model.visual.").replace("model.model.language_model.", "model.model.")
        legacy[key] = value
    target = tmp_path / "legacy"
    target.mkdir()
    save_file(legacy, str(target / "model.safetensors"), metadata={"format": "pt"})
    for f in folder.iterdir():
        if not f.name.endswith((".safetensors", ".index.json")):
            (target / f.name).write_bytes(f.read_bytes())
    loaded, _ = _load(cfg, target)
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == []


def test_flat_text_config_of_older_transformers_is_read(qwen_folder, tmp_path):
    family, cfg, _, _, folder = qwen_folder
    if family != "qwen2_5_vl":
        pytest.skip("Qwen3-VL configs were always nested")
    target = tmp_path / "flat"
    target.mkdir()
    for f in folder.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    text = config.pop("text_config")
    text.pop("rope_parameters")
    config.update({k: v for k, v in text.items() if k not in ("model_type", "architectures")})
    (target / "config.json").write_text(json.dumps(config))
    loaded, _ = _load(cfg, target)
    assert loaded.base_mllm.config.text_config.hidden_size == cfg.text["hidden_size"]


def test_wrong_family_or_size_is_refused(qwen_folder):
    family, _, _, _, folder = qwen_folder
    other = "qwen3_vl" if family == "qwen2_5_vl" else "qwen2_5_vl"
    with pytest.raises(CheckpointError, match=rf"model\.family: preset '{other}', checkpoint '{family}'"):
        _load(tiny_cfg(FAMILIES[other]).model, folder)
    with pytest.raises(CheckpointError, match=r"model\.family: preset 'internvl'"):
        _load(tiny_cfg().model, folder)
    bigger = tiny_cfg(FAMILIES[family] + ["model.text.num_hidden_layers=3"]).model
    with pytest.raises(CheckpointError, match=r"model\.text\.num_hidden_layers: preset 3, checkpoint 2"):
        _load(bigger, folder)


def test_missing_and_unexpected_keys_are_listed(qwen_folder, tmp_path):
    _, cfg, _, _, folder = qwen_folder
    tensors = _tensors(folder)
    tensors.pop("model.model.language_model.norm.weight")
    tensors["model.model.visual.extra.weight"] = torch.zeros(2)
    target = tmp_path / "broken"
    target.mkdir()
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    for f in folder.iterdir():
        if not f.name.endswith((".safetensors", ".index.json")):
            (target / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError) as err:
        _load(cfg, target)
    assert "mllm.model.language_model.norm.weight" in str(err.value)
    assert "model.model.visual.extra.weight" in str(err.value)


def test_layout_renames_by_prefix_only():
    layout = QwenVLLayout()
    t = torch.zeros(1)
    pairs = {
        "model.model.visual.blocks.0.attn.qkv.weight": "mllm.model.visual.blocks.0.attn.qkv.weight",
        "model.model.visual.merger.mlp.0.bias": "mllm.model.visual.merger.mlp.0.bias",
        "model.model.language_model.layers.1.self_attn.q_norm.weight": (
            "mllm.model.language_model.layers.1.self_attn.q_norm.weight"
        ),
        "model.lm_head.weight": "mllm.lm_head.weight",
        "text_hidden_fcs.2.bias": "text_hidden_fcs.2.bias",
        "grounding_encoder.sam2_model.no_mem_embed": "grounding.sam.no_memory_embedding",
    }
    for official, native in pairs.items():
        assert [p.key for p in layout.to_native(official, t)] == [native]
        assert list(dict(layout.to_official({native: t}, tied=False))) == [official]
    memory = "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.g_weight"
    assert [p.key for p in layout.to_native(memory, t)] == [
        "grounding.memory.memory_encoder.memory_fuser.layers.0.scale"
    ]
    layout.with_memory = False
    assert layout.is_dropped(memory)
    assert layout.to_native("vision_model.encoder.layers.0.attn.qkv.weight", t) is None  # InternVL names: unknown


def test_an_untied_release_loads_with_a_tied_preset(tmp_path, caplog):
    """Sa2VA's converter writes Qwen releases untied even where the base ties (our tiny_qwen3vl preset ties):
    the folder decides how the head is stored, with a warning, instead of refusing the release."""
    untied = tiny_cfg(["model=tiny_qwen3vl", "model.tie_word_embeddings=false"]).model
    torch.manual_seed(0)
    model, tokenizer = build_sa2va(untied, None)
    write_official_folder(model, untied, tokenizer, tmp_path, "float32", max_shard_bytes=1 << 30)
    tied_preset = tiny_cfg(["model=tiny_qwen3vl"]).model
    assert tied_preset.tie_word_embeddings is True
    with caplog.at_level("WARNING"):
        loaded, loaded_tokenizer = _load(tied_preset, tmp_path)
    assert "the checkpoint's value is used" in caplog.text
    assert loaded.base_mllm.config.tie_word_embeddings is False
    for a, b in zip(
        model_outputs(model, tokenizer, untied), model_outputs(loaded, loaded_tokenizer, untied), strict=True
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_folder_with_the_authors_qwen_token_set_loads(family, tmp_path):
    """The authors' Qwen-VL Sa2VA adds only [SEG] <p> </p> <vp> </vp> (the image tokens are Qwen's own): such a
    folder loads, gains no token, and predicts what the model that wrote it predicts."""
    tokenizer_dir = tmp_path / "tokenizer"
    build_tiny_tokenizer(image_tokens=False).save_pretrained(str(tokenizer_dir))
    cfg = tiny_cfg([*FAMILIES[family], f"model.tokenizer_path={tokenizer_dir}"]).model
    torch.manual_seed(0)
    model, tokenizer = build_sa2va(cfg, None)
    vocab = tokenizer.get_vocab()
    assert not any(t in vocab for t in IMAGE_TOKENS) and all(t in vocab for t in SA2VA_ADDED_TOKENS)
    folder = tmp_path / "release"
    folder.mkdir()
    write_official_folder(model, cfg, tokenizer, folder, "float32", max_shard_bytes=1 << 30)
    loaded, loaded_tokenizer = _load(dataclasses.replace(cfg, tokenizer_path=None), folder)
    assert loaded_tokenizer.get_vocab() == vocab
    for a, b in zip(model_outputs(model, tokenizer, cfg), model_outputs(loaded, loaded_tokenizer, cfg), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_theta"])
def test_rope_is_read_from_either_spelling(qwen_folder, spelling):
    """transformers 5 writes `rope_parameters` (+ `rope_scaling: null`), the authors' 4.5x code `rope_theta`."""
    from vseg.model.families.qwen_vl_release import qwen_architecture_from_config

    _, _, _, _, folder = qwen_folder
    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    section = dict(text["rope_parameters"])
    text.pop("rope_theta", None)
    if spelling == "rope_parameters":
        text.update(rope_scaling=None, rope_parameters={**section, "rope_theta": 12345.0})
    else:
        text.pop("rope_parameters")
        text.update(rope_theta=12345.0, rope_scaling={k: v for k, v in section.items() if k != "rope_theta"})
    rope = qwen_architecture_from_config(config)["text"]["rope_parameters"]
    assert rope["rope_theta"] == 12345.0
    assert rope.get("mrope_section") == section.get("mrope_section")
