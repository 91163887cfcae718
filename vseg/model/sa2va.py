"""The Sa2VA network: an MLLM whose [SEG] token becomes a SAM-2 prompt.

Data path: the MLLM reads the image tiles and the conversation; the last-layer hidden state at every
position whose *input* token is [SEG] goes through `text_hidden_fcs` (Linear-ReLU-Linear) into the SAM-2
prompt width; SAM-2 turns each such embedding into mask logits for the image of the same sample.
The MLLM family (InternVL today, Qwen-VL later) is hidden behind `MLLMFamily`; nothing here depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vseg.model.families import MLLMFamily
from vseg.model.grounding import SamGrounding

IGNORE_INDEX = -100


@dataclass
class Sa2VAOutput:
    """What one forward pass yields; losses are sums so they can be normalised over any window.

    DeepSpeed ZeRO-3 warns that it cannot find the tensors of this output to hook the Sa2VA module's
    backward. Harmless: the module's only ZeRO-3 parameter is SAM-2's frozen no-memory embedding (registered
    as its external parameter), which the backward of the addition it enters does not read.
    """

    llm_loss_sum: torch.Tensor  # scalar: summed next-token CE over supervised (answer) tokens
    llm_tokens: torch.Tensor  # scalar long: how many tokens that sum covers
    mask_logits: torch.Tensor  # (N, h, w) low-res logits, one per [SEG] token, in batch order
    seg_sample_index: torch.Tensor  # (N,) which sample of the batch each mask belongs to


@dataclass
class Positions:
    """Where the step gathers from, found before the batch reaches the GPU (`find_positions`).

    Gathering with these index tensors needs no host sync; a boolean mask (`hidden[input_ids == seg]`) makes
    the host wait for the GPU to learn how many rows it selects.
    """

    seg: torch.Tensor  # (N, 2) long: (sample, position) of every [SEG] input token, in (sample, position) order
    answer: torch.Tensor  # (T, 2) long: (sample, position) whose next token is supervised (labels[s, p + 1])


def find_positions(input_ids: torch.Tensor, labels: torch.Tensor, seg_token_id: int) -> Positions:
    """[SEG] and answer positions of a batch, on the device of its ids (the host, in a collate or before transfer)."""
    return Positions((input_ids == seg_token_id).nonzero(), (labels[:, 1:] != IGNORE_INDEX).nonzero())


def build_text_hidden_fcs(hidden_size: int, prompt_size: int) -> nn.Sequential:
    """Sa2VA's [SEG] projection; indices 0 and 2 match the released checkpoint keys."""
    return nn.Sequential(
        nn.Linear(hidden_size, hidden_size),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_size, prompt_size),
        nn.Dropout(0.0),
    )


class Sa2VA(nn.Module):
    """MLLM + SAM-2 grounding + [SEG] projection.

    Args:
        mllm: a transformers vision-language model of `family` (may later be wrapped by PEFT).
        family: how to reach that model's decoder, head and image inputs.
        grounding: the SAM-2 wrapper.
        seg_token_id: id of [SEG] in the tokenizer.
    """

    def __init__(self, mllm: nn.Module, family: MLLMFamily, grounding: SamGrounding, seg_token_id: int):
        super().__init__()
        self.mllm = mllm
        self.family = family
        self.grounding = grounding
        self.seg_token_id = seg_token_id
        hidden = family.text_hidden_size(self.base_mllm)
        prompt = int(grounding.sam.config.prompt_encoder_config.hidden_size)
        self.text_hidden_fcs = build_text_hidden_fcs(hidden, prompt)

    @property
    def base_mllm(self) -> nn.Module:
        """The transformers model, with PEFT's wrapper (if any) peeled off; adapters stay injected."""
        mllm = self.mllm
        return mllm.get_base_model() if hasattr(mllm, "get_base_model") else mllm

    def decoder_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        mllm_inputs: dict[str, Any],
        row_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer (final-norm) hidden states of the LLM, (B, L, D).

        `row_image` (B,): the rows share images (several questions per image); `mllm_inputs` then holds each
        image once and the vision encoder runs once per image (`MLLMFamily.decoder_states`).
        """
        return self.family.decoder_states(self.base_mllm, input_ids, attention_mask, mllm_inputs, row_image)

    def seg_embeddings(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, positions: Positions | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected [SEG] states (N, C) and the sample index of each, in (sample, position) order."""
        first = self.text_hidden_fcs[0].weight
        if positions is not None:
            at = positions.seg.to(hidden.device, non_blocking=True)
            states, sample_index = hidden[at[:, 0], at[:, 1]], at[:, 0]
        else:
            seg = input_ids.to(hidden.device) == self.seg_token_id
            sample_index = seg.nonzero(as_tuple=True)[0]
            states = hidden[seg]
        return self.text_hidden_fcs(states.to(device=first.device, dtype=first.dtype)), sample_index

    def llm_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, positions: Positions | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over supervised positions, computing logits only there.

        Projecting only the answer positions through lm_head avoids a (B, L, vocab) logits tensor,
        which at a 152k vocabulary is larger than the activations of the whole LLM. With `positions` the
        count is known on the host (a CPU tensor) and nothing waits for the GPU.
        """
        labels = labels.to(hidden.device)
        if positions is not None:
            at = positions.answer.to(hidden.device, non_blocking=True)
            states, targets = hidden[at[:, 0], at[:, 1]], labels[at[:, 0], at[:, 1] + 1]
            count = torch.tensor(at.shape[0])
        else:
            keep = labels[:, 1:] != IGNORE_INDEX
            states, targets = hidden[:, :-1][keep], labels[:, 1:][keep]
            count = keep.sum()
        if states.shape[0] == 0:
            return hidden.sum() * 0.0, count
        head = self.family.lm_head(self.base_mllm)
        logits = head(states).float()
        loss = F.cross_entropy(logits, targets.to(logits.device), reduction="sum")
        return loss, count

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        sam_pixel_values: torch.Tensor,
        mllm_inputs: dict[str, Any],
        backbone: list[torch.Tensor] | None = None,
        positions: Positions | None = None,
    ) -> Sa2VAOutput:
        """Teacher-forced pass: LM loss on the answer and one mask per [SEG] token.

        Args:
            input_ids: (B, L) token ids, image-context placeholders included.
            attention_mask: (B, L) 1 for real tokens; None when no row is padded.
            labels: (B, L) target ids, IGNORE_INDEX outside the answers.
            sam_pixel_values: (B, 3, S, S) SAM-2 inputs, one image per sample.
            mllm_inputs: the family's image inputs (e.g. InternVL `pixel_values` of all tiles).
            backbone: SAM-2 backbone features of these images already computed (`BackboneCache`); None: from
                `sam_pixel_values`.
            positions: [SEG] and answer positions found on the host (`find_positions`); None: found here from
                `input_ids` / `labels` (each boolean gather then waits for the GPU).
        """
        hidden = self.decoder_states(input_ids, attention_mask, mllm_inputs)
        llm_sum, llm_tokens = self.llm_loss(hidden, labels, positions)
        prompts, sample_index = self.seg_embeddings(hidden, input_ids, positions)
        if backbone is None:
            backbone = self.grounding.encode_backbone(sam_pixel_values)
        features = self.grounding.project(backbone)
        mask_logits = self.grounding.decode(features, prompts, sample_index)
        return Sa2VAOutput(llm_sum, llm_tokens, mask_logits, sample_index)
