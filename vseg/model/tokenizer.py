"""Tokenizers and chat templates for Sa2VA.

Sa2VA does not use Hugging Face chat templates: it formats turns with the xtuner-style templates of its
base MLLM (`qwen_chat`, `phi3_chat`, `internlm2_chat`). Those live here as data, next to the special
tokens the model needs ([SEG], the image markers) and a tiny byte-level tokenizer that is built locally,
so `model=tiny` runs with no network and no shipped files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast, SentencePieceBackend

from vseg.config import SEG_TOKEN, TEMPLATE_NAMES

log = logging.getLogger(__name__)

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
# Tokens Sa2VA adds on top of its base MLLM; released checkpoints already contain them.
SA2VA_ADDED_TOKENS = (SEG_TOKEN, "<p>", "</p>", "<vp>", "</vp>")
IMAGE_TOKENS = (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
# Qwen-VL's image markers (already in every Qwen2.5-VL / Qwen3-VL tokenizer; the tiny one carries them too).
QWEN_VISION_START_TOKEN = "<|vision_start|>"
QWEN_VISION_END_TOKEN = "<|vision_end|>"
QWEN_IMAGE_PAD_TOKEN = "<|image_pad|>"
QWEN_VIDEO_PAD_TOKEN = "<|video_pad|>"
QWEN_VISION_TOKENS = (QWEN_VISION_START_TOKEN, QWEN_VISION_END_TOKEN, QWEN_IMAGE_PAD_TOKEN, QWEN_VIDEO_PAD_TOKEN)


@dataclass(frozen=True)
class ChatTemplate:
    """One conversation format: how a user turn opens and how the assistant's answer ends."""

    name: str
    system: str  # formatted with {system}
    instruction: str  # formatted with {input}; ends where the assistant's answer starts
    suffix: str  # closes the assistant's answer; part of the supervised answer tokens
    bos: str = ""  # prepended to the whole conversation (InternLM2 starts with <s>)
    stop_words: tuple[str, ...] = ()


TEMPLATES: dict[str, ChatTemplate] = {
    "qwen_chat": ChatTemplate(
        name="qwen_chat",
        system="<|im_start|>system\n{system}<|im_end|>\n",
        instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        suffix="<|im_end|>",
        stop_words=("<|im_end|>", "<|endoftext|>"),
    ),
    "phi3_chat": ChatTemplate(
        name="phi3_chat",
        system="<|system|>\n{system}<|end|>\n",
        instruction="<|user|>\n{input}<|end|>\n<|assistant|>\n",
        suffix="<|end|>",
        stop_words=("<|end|>",),
    ),
    "internlm2_chat": ChatTemplate(
        name="internlm2_chat",
        system="<|im_start|>system\n{system}<|im_end|>\n",
        instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        suffix="<|im_end|>",
        bos="<s>",
        stop_words=("<|im_end|>",),
    ),
}
assert tuple(TEMPLATES) == TEMPLATE_NAMES, "vseg.config.TEMPLATE_NAMES must list TEMPLATES' names"


def get_template(name: str) -> ChatTemplate:
    """Returns the chat template called `name` or raises with the known names."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


# Text the tiny tokenizer learns its merges from: the words our prompts and templates use, so that
# tiny sequences stay short. Deterministic: the BPE trainer is deterministic for a fixed corpus.
_TINY_CORPUS = (
    "Please segment the blood vessels in this image. Segment the vessels. Can you segment the vessel tree "
    "in this picture? What are the blood vessels here? Please output the segmentation mask of the vessels. "
    "Highlight the retinal vessels. Where are the arteries and veins? It is [SEG]. Sure, it is [SEG]. "
    "Sure, [SEG]. system user assistant You are a helpful assistant for medical image segmentation."
)


def build_tiny_tokenizer(vocab_size: int = 512, image_tokens: bool = True) -> PreTrainedTokenizerFast:
    """Builds a small byte-level BPE tokenizer with the Qwen-style specials, offline and in milliseconds.

    Args:
        vocab_size: upper bound on the learned vocabulary (bytes + merges), before special tokens.
        image_tokens: include InternVL's `<img>`, `</img>`, `<IMG_CONTEXT>` (a Qwen-VL Sa2VA release has none).

    Returns:
        A fast tokenizer whose special tokens include the chat markers, the image tokens and [SEG].
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    base_specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=base_specials,
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
    )
    internvl = list(IMAGE_TOKENS) if image_tokens else []
    specials = ["<|im_start|>", *internvl, *SA2VA_ADDED_TOKENS, *QWEN_VISION_TOKENS]  # Qwen ones last: ids kept
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast


class InternLM2Tokenizer(SentencePieceBackend):
    """InternLM2's tokenizer (Sa2VA-8B / 26B) without the remote `tokenization_internlm2.py`.

    Same behaviour as the authors' slow class: the text is split at added / special tokens, every other
    piece goes through the folder's sentencepiece model as it is (`encode(text, out_type=str)`, its own
    normaliser and dummy prefix included: `legacy` mode), ids are the model's pieces, added tokens keep the
    ids of tokenizer_config.json; `<s>` is prepended when special tokens are added, nothing appended.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "</s>",
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ):
        try:
            import sentencepiece  # noqa: F401
        except ImportError:
            raise ImportError(
                "an InternLM2 tokenizer (tokenizer.model) needs the sentencepiece package: pip install sentencepiece"
            ) from None
        self._bos_on, self._eos_on = bool(add_bos_token), bool(add_eos_token)
        for key in ("legacy", "decode_with_prefix_space", "tokenizer_class"):
            kwargs.pop(key, None)
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            legacy=True,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        out = ([self.bos_token_id] if self._bos_on else []) + list(token_ids_0)
        if token_ids_1 is not None:
            out += list(token_ids_1)
        return out + ([self.eos_token_id] if self._eos_on else [])

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [int(i in special) for i in token_ids_0 + (token_ids_1 or [])]
        body = [0] * (len(token_ids_0) + len(token_ids_1 or []))
        return [1] * self._bos_on + body + [1] * self._eos_on

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # Runs of ordinary pieces are decoded by sentencepiece (byte fallback, "▁" -> space); special
        # tokens are kept as they are.
        out, run = [], []
        special = set(self.all_special_tokens)
        for token in tokens:
            if token in special:
                out.append(self.sp_model.decode(run))
                out.append(token)
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode(run))
        return "".join(out)


#: `tokenizer_class` values in tokenizer_config.json that name InternLM2's remote-code tokenizer
INTERNLM2_TOKENIZER_CLASSES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")


def _tokenizer_class_name(folder: Path) -> str | None:
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    name = config.get("tokenizer_class")
    auto = (config.get("auto_map") or {}).get("AutoTokenizer") or []
    if name is None and any(isinstance(a, str) and "tokenization_internlm2" in a for a in auto):
        name = "InternLM2Tokenizer"
    return name


def load_tokenizer(path: str | None) -> PreTrainedTokenizerBase:
    """Loads the tokenizer of a local model folder, or the tiny built-in one when `path` is None.

    Never runs remote code and never reaches a hub: `path` must be an existing local directory. InternLM2
    folders (Sa2VA-8B / 26B: `tokenizer.model` + the authors' `tokenization_internlm2*.py`) load into vseg's
    own `InternLM2Tokenizer`, which encodes exactly as the authors' class does.
    """
    if path is None:
        return build_tiny_tokenizer()
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist (model.path / model.tokenizer_path)")
    if _tokenizer_class_name(folder) in INTERNLM2_TOKENIZER_CLASSES:
        if not (folder / "tokenizer.model").is_file():
            raise FileNotFoundError(f"{folder}: an InternLM2 tokenizer needs tokenizer.model, which is missing")
        return InternLM2Tokenizer.from_pretrained(str(folder), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)


def ensure_special_tokens(
    tokenizer: PreTrainedTokenizerBase, tokens: tuple[str, ...] = (*IMAGE_TOKENS, *SA2VA_ADDED_TOKENS)
) -> list[str]:
    """Adds those of `tokens` (a family's `added_tokens`) the tokenizer lacks; returns the ones it added.

    A released Sa2VA checkpoint already holds them (nothing is added, so no embedding resize);
    a plain base MLLM gets them here, on CPU, before any model is built or sharded.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        log.info("added %d special tokens to the tokenizer: %s", len(missing), missing)
    return missing


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of a single special token; raises if the tokenizer splits or lacks it."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no token {token!r}")
    return int(ids[0])
