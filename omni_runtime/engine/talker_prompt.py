"""The talker's prompt and its per-step text conditioning, built from the thinker as its tokens arrive.

Prefill = user part + 9 assistant positions (the element-wise sum of a text side and a codec side):

    text  : A0 A1 A2 pad pad pad pad bos A3          (A = text_projection of the assistant turn's embeddings)
    codec : 0  0  0  nothink think_bos think_eos speaker codec_pad codec_bos

``A`` runs over the prompt from the last ``<|im_start|>assistant`` on, then the generated tokens. Step k of the
talker adds ``A[4 + k]``; after the last spoken row comes ``tts_eos``, then ``tts_pad`` forever. The thinker's last
token is never spoken: an EOS ends the text, and (as in the reference) a token cut by ``max_new_tokens`` is dropped.
So row r is known as soon as the token it stands for exists, and the talker never waits for the whole answer.
"""
from __future__ import annotations

import torch

from omni_runtime.config import SpecialTokens, TalkerConfig
from omni_runtime.models.talker import Talker

ASSISTANT_TEXT_ROWS = 3   # <|im_start|> assistant \n, spoken as part of the prefill


def user_positions(ids: torch.Tensor, tokens: SpecialTokens) -> torch.Tensor:
    """Indices of every prompt token inside a user turn (its <|im_start|>user\\n and <|im_end|> included)."""
    positions = torch.arange(ids.numel(), device=ids.device)
    starts = torch.where(ids == tokens.im_start, positions, -1)
    turn_start = torch.cummax(starts, dim=0).values.clamp_min(0)
    role = ids[(turn_start + 1).clamp_max(ids.numel() - 1)]
    return positions[role == tokens.user]


def assistant_start(ids: torch.Tensor, tokens: SpecialTokens) -> int:
    starts = ((ids[:-1] == tokens.im_start) & (ids[1:] == tokens.assistant)).nonzero().flatten()
    if starts.numel() == 0:
        raise ValueError("speech needs a prompt that opens the assistant turn (<|im_start|>assistant\\n) for the "
                         "talker to speak; none found in input_ids")
    return int(starts[-1])


class TextConditioner:
    """Projected assistant rows as they become known, and tts_eos/tts_pad once the text has ended."""

    def __init__(self, talker: Talker, embed_tokens: torch.nn.Embedding, tokens: SpecialTokens):
        self.talker, self.embed_tokens = talker, embed_tokens
        specials = torch.tensor([[tokens.tts_bos, tokens.tts_eos, tokens.tts_pad]], device=embed_tokens.weight.device)
        self.bos, self.eos, self.pad = talker.text_projection(embed_tokens(specials)).chunk(3, dim=1)  # [1, 1, H]
        self.rows: list[torch.Tensor] = []
        self.spoken_rows: int | None = None   # set when the thinker has finished

    def add_prompt(self, embeds: torch.Tensor) -> None:
        """embeds: [1, n, Ht] thinker embeddings of the prompt from the assistant turn's <|im_start|> on."""
        self.rows.extend(self.talker.text_projection(embeds).split(1, dim=1))

    def add_token(self, token: torch.Tensor, is_last: bool) -> None:
        if is_last:
            self.spoken_rows = len(self.rows)
        else:
            self.rows.append(self.talker.text_projection(self.embed_tokens(token.view(1, 1))))

    def ready(self, row: int) -> bool:
        return row < len(self.rows) or self.spoken_rows is not None

    def row(self, row: int) -> torch.Tensor:
        if row < len(self.rows):
            return self.rows[row]
        return self.eos if row == self.spoken_rows else self.pad


def talker_user_embeds(talker: Talker, cfg: TalkerConfig, tokens: SpecialTokens, ids: torch.Tensor,
                       prompt_embeds: torch.Tensor, prompt_hidden: torch.Tensor | None, start: int = 0,
                       end: int | None = None) -> torch.Tensor:
    """The talker's rows of the user-turn tokens among prompt tokens ``start:end``: ids [P], prompt_embeds [1, P, Ht]
    (layer-0 inputs), prompt_hidden [1, end - start, Ht] (the accepted hidden layer of those tokens) -> [1, u, H].
    Audio, image and video tokens take the projected hidden state, text tokens the projected embedding."""
    end = ids.numel() if end is None else end
    user = user_positions(ids, tokens)
    user = user[(user >= start) & (user < end)]
    kind = ids[user]
    multimodal = (kind == tokens.audio) | (kind == tokens.image) | (kind == tokens.video)
    rows = prompt_embeds.new_empty(1, user.numel(), cfg.text.hidden_size)
    if multimodal.any():
        rows[:, multimodal] = talker.hidden_projection(prompt_hidden[:, user[multimodal] - start])
    rows[:, ~multimodal] = talker.text_projection(prompt_embeds[:, user[~multimodal]])
    return rows


def talker_assistant_embeds(talker: Talker, cfg: TalkerConfig, text: TextConditioner, speaker_id: int) -> torch.Tensor:
    """The 9 assistant rows that end the talker's prefill (text side + codec side, the module docstring) -> [1, 9, H];
    they need the first generated token's row."""
    codec_ids = torch.tensor([[cfg.codec_nothink, cfg.codec_think_bos, cfg.codec_think_eos, speaker_id,
                               cfg.codec_pad, cfg.codec_bos]], device=text.pad.device)
    text_side = torch.cat([*(text.row(r) for r in range(ASSISTANT_TEXT_ROWS)), text.pad.expand(1, 4, -1), text.bos,
                           text.row(ASSISTANT_TEXT_ROWS)], dim=1)                          # [1, 9, H]
    codec_side = torch.cat([text_side.new_zeros(1, ASSISTANT_TEXT_ROWS, text_side.shape[-1]),
                            talker.model.codec_embedding(codec_ids)], dim=1)             # [1, 9, H]
    return text_side + codec_side


def talker_prefill_embeds(talker: Talker, cfg: TalkerConfig, tokens: SpecialTokens, ids: torch.Tensor,
                          prompt_embeds: torch.Tensor, prompt_hidden: torch.Tensor | None,
                          text: TextConditioner, speaker_id: int) -> torch.Tensor:
    """ids: [P], prompt_embeds/prompt_hidden: [1, P, Ht] (layer-0 inputs / accepted hidden layer) -> [1, U + 9, H]."""
    return torch.cat([talker_user_embeds(talker, cfg, tokens, ids, prompt_embeds, prompt_hidden),
                      talker_assistant_embeds(talker, cfg, text, speaker_id)], dim=1)
