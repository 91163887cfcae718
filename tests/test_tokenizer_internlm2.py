"""InternLM2 tokenizer folders (Sa2VA-8B / 26B ship `tokenizer.model` + remote `tokenization_internlm2*.py`) load
without remote code and encode exactly as the authors' class.

The test trains its own tiny sentencepiece BPE model (byte fallback, the chat markers as user-defined pieces,
like InternLM2's) and writes a folder the way the release does (tokenizer_config.json naming
`InternLM2Tokenizer` through auto_map, the image / Sa2VA tokens as added special tokens after the model's
pieces). vseg's tokenizer is compared with:
* an independent reference built here: split at added tokens, `sentencepiece.encode` each piece, `<s>` first;
* the authors' own `tokenization_internlm2.py`, read from the Sa2VA mirror into a temporary folder and imported
  there (never copied into the repository); skipped with the reason when the mirror is absent.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import subprocess
from pathlib import Path

import pytest

spm = pytest.importorskip("sentencepiece")

from vseg.model.tokenizer import SA2VA_ADDED_TOKENS, SEG_TOKEN, load_tokenizer, token_id  # noqa: E402

MIRRORS = [Path("/work/.mirror/bytedance+Sa2VA/repo"), Path("/work/.mirror/magic-research+Sa2VA/repo")]
THEIR_FILES = (
    "projects/sa2va/hf/models/tokenization_internlm2.py",
    "projects/llava_sam2/hf/models/tokenization_internlm2.py",
)
CHAT = ["<|im_start|>", "<|im_end|>"]
ADDED = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
ADDED += list(SA2VA_ADDED_TOKENS)
CORPUS = [
    "Please segment the blood vessels in this image.",
    "Can you segment the vessel tree in this picture? Sure, it is done.",
    "system user assistant You are a helpful assistant for medical image segmentation.",
    "The arteries and veins of the retina, 0123456789, fundus and angiogram images.",
] * 20
TEXTS = [
    "<s><|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nPlease segment the blood vessels.<|im_end|>\n"
    "<|im_start|>assistant\nIt is [SEG].<|im_end|>",
    "<img><IMG_CONTEXT></img>Segment the vessels.",
    "  two leading spaces,   runs of   spaces\n\n\tand tabs",
    "Unseen: 数字 émoji 🙂 ß — byte fallback",
    "[SEG][SEG] <p>vessel</p> <vp></vp>",
    "",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A released-style InternLM2 tokenizer folder around a sentencepiece model trained here."""
    out = tmp_path_factory.mktemp("internlm2_tokenizer")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        model_type="bpe",
        vocab_size=320,
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=CHAT,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = processor.get_piece_size()

    def entry(content: str) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    decoder = {str(processor.piece_to_id(t)): entry(t) for t in ["<unk>", "<s>", "</s>", *CHAT]}
    decoder.update({str(pieces + i): entry(t) for i, t in enumerate(ADDED)})
    config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "added_tokens_decoder": decoder,
        "additional_special_tokens": CHAT + ADDED,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenization_internlm2.py").write_text("raise RuntimeError('remote code must never run')\n")
    return out


def reference_ids(folder: Path, text: str) -> list[int]:
    """The authors' algorithm, re-derived: cut at added tokens, sentencepiece-encode the rest, `<s>` first."""
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    decoder = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    added = {v["content"]: int(k) for k, v in decoder.items()}
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    ids = [processor.bos_id()]
    for chunk in re.split(pattern, text):
        if chunk in added:
            ids.append(added[chunk])
        elif chunk:
            ids.extend(processor.encode(chunk))
    return ids


def their_tokenizer(folder: Path, tmp_path: Path):
    """The authors' InternLM2Tokenizer, read from the mirror at test time, or skip saying why."""
    for mirror in MIRRORS:
        if not mirror.is_dir():
            continue
        for path in THEIR_FILES:
            shown = subprocess.run(
                ["git", "-C", str(mirror), "show", f"HEAD:{path}"], capture_output=True, text=True, check=False
            )
            if shown.returncode == 0:
                source = tmp_path / "their_tokenization_internlm2.py"
                source.write_text(shown.stdout)
                spec = importlib.util.spec_from_file_location("their_tokenization_internlm2", source)
                module = importlib.util.module_from_spec(spec)
                try:
                    spec.loader.exec_module(module)
                    return module.InternLM2Tokenizer.from_pretrained(str(folder))
                except Exception as err:  # their code on this transformers version
                    pytest.skip(f"the authors' tokenization_internlm2.py does not run here: {err!r}")
    pytest.skip(f"no Sa2VA source mirror with tokenization_internlm2.py under {[str(m) for m in MIRRORS]}")


def test_loads_without_remote_code_and_matches_the_reference(folder):
    tokenizer = load_tokenizer(str(folder))  # the decoy tokenization_internlm2.py would raise if it ran
    assert type(tokenizer).__name__ == "InternLM2Tokenizer" and type(tokenizer).__module__.startswith("vseg.")
    pieces = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
    assert len(tokenizer) == pieces + len(ADDED)
    assert token_id(tokenizer, SEG_TOKEN) == pieces + ADDED.index(SEG_TOKEN)
    assert token_id(tokenizer, "<|im_end|>") < pieces  # in the model's own pieces, not re-added
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == tokenizer.pad_token_id == 2
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == reference_ids(folder, text), text
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference_ids(folder, text)[1:], text


def test_matches_the_authors_tokenizer_class(folder, tmp_path):
    theirs = their_tokenizer(folder, tmp_path)
    mine = load_tokenizer(str(folder))
    assert len(mine) == len(theirs)
    assert mine.get_vocab() == theirs.get_vocab()
    for text in TEXTS:
        assert mine(text)["input_ids"] == theirs(text)["input_ids"], text
        assert mine(text, add_special_tokens=False)["input_ids"] == theirs(text, add_special_tokens=False)["input_ids"]
    saved = tmp_path / "saved"
    mine.save_pretrained(str(saved))  # what `vseg export` writes: the authors' class reads it the same way
    theirs_again = type(theirs).from_pretrained(str(saved))
    assert [theirs_again(t)["input_ids"] for t in TEXTS] == [theirs(t)["input_ids"] for t in TEXTS]
    plain = "Please segment the blood vessels."
    assert mine.decode(mine(plain, add_special_tokens=False)["input_ids"]) == plain
    assert theirs.decode(theirs(plain, add_special_tokens=False)["input_ids"]) == plain


def test_saved_tokenizer_loads_back_identically(folder, tmp_path):
    tokenizer = load_tokenizer(str(folder))
    tokenizer.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config.get("tokenizer_class") == "InternLM2Tokenizer"  # the authors' code finds its class again ...
    assert config.get("auto_map", {}).get("AutoTokenizer", [None])[0] == "tokenization_internlm2.InternLM2Tokenizer"
    again = load_tokenizer(str(tmp_path))
    assert len(again) == len(tokenizer)
    for text in TEXTS:
        assert again(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_missing_tokenizer_model_is_a_clear_error(folder, tmp_path):
    (tmp_path / "tokenizer_config.json").write_bytes((folder / "tokenizer_config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"InternLM2 tokenizer needs tokenizer\.model"):
        load_tokenizer(str(tmp_path))
