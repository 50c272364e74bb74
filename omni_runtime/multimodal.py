"""Multimodal prompts: encoder features written into the placeholder positions, TM-RoPE positions, DeepStack.

``generate``/``stream`` take the reference processor's names for media inputs (``MediaInputs``). Audio features go
to the ``<|audio_pad|>`` positions, image/video tokens to ``<|image_pad|>``/``<|video_pad|>``, in prompt order; the
vision encoder's DeepStack features are added after the first thinker layers at the visual positions. A placeholder
count that disagrees with the features is an error naming both.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from omni_runtime.config import OmniConfig, SpecialTokens
from omni_runtime.engine.talker_prompt import user_positions
from omni_runtime.positions import rope_positions


@dataclass
class MediaInputs:
    input_features: torch.Tensor | None = None          # [n_audio, 128, T_pad] log-mel
    feature_attention_mask: torch.Tensor | None = None  # [n_audio, T_pad] 1 for valid frames
    pixel_values: torch.Tensor | None = None            # [N_patch, 1536] image patches
    image_grid_thw: torch.Tensor | None = None          # [n_image, 3]
    pixel_values_videos: torch.Tensor | None = None     # [N_patch, 1536] video patches
    video_grid_thw: torch.Tensor | None = None          # [n_video, 3]
    video_second_per_grid: torch.Tensor | None = None  # [n_video] seconds per temporal grid step
    use_audio_in_video: bool = False

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> MediaInputs:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown generate arguments {unknown}; media inputs are {sorted(names)}")
        return cls(**kwargs)

    @property
    def has_audio(self) -> bool:
        return self.input_features is not None

    @property
    def has_visual(self) -> bool:
        return self.pixel_values is not None or self.pixel_values_videos is not None


def media_token_count(ids: torch.Tensor, tokens: SpecialTokens) -> int:
    """The prompt's audio, image and video placeholders: the tokens its encoders make."""
    return int(((ids == tokens.audio) | (ids == tokens.image) | (ids == tokens.video)).sum())


@dataclass
class Deepstack:
    mask: torch.Tensor              # [P] bool, visual positions
    features: list[torch.Tensor]    # one [N_visual, H] per early layer


@dataclass
class PromptInputs:
    embeds: torch.Tensor            # [1, P, H] layer-0 inputs
    positions: torch.Tensor         # [3, 1, P]
    deepstack: Deepstack | None = None


def audio_features(media: MediaInputs, audio_encoder) -> torch.Tensor:
    """[N_audio_tokens, H] for every audio, in order."""
    features, mask = media.input_features, media.feature_attention_mask
    if mask is None or features.dim() != 3 or mask.shape != (features.shape[0], features.shape[2]):
        raise ValueError("input_features [n, mel, frames] needs feature_attention_mask [n, frames], got "
                         f"{tuple(features.shape)} and {None if mask is None else tuple(mask.shape)}")
    lengths = mask.sum(dim=1).tolist()
    return audio_encoder([features[i, :, :n] for i, n in enumerate(lengths)])


def _scatter(embeds: torch.Tensor, where: torch.Tensor, values: torch.Tensor, what: str) -> None:
    if int(where.sum()) != values.shape[0]:
        raise ValueError(f"the prompt has {int(where.sum())} {what} placeholder tokens but the {what} input gives "
                         f"{values.shape[0]} features")
    embeds[0, where] = values.to(embeds.dtype)


def build_prompt(ids: torch.Tensor, media: MediaInputs, config: OmniConfig, embed_tokens, audio_encoder,
                 vision_encoder) -> PromptInputs:
    """ids: [P] -> the thinker's prefill inputs."""
    tokens = config.tokens
    embeds = embed_tokens(ids.view(1, -1))
    if media.has_audio:
        if audio_encoder is None:
            raise ValueError("audio input needs the checkpoint's audio encoder (thinker.audio_tower), absent here")
        audio = audio_features(media, audio_encoder)
        _scatter(embeds, ids == tokens.audio, audio, "audio")
    visual_masks, deepstacks = [], []
    for pixels, grid, token, what in ((media.pixel_values, media.image_grid_thw, tokens.image, "image"),
                                      (media.pixel_values_videos, media.video_grid_thw, tokens.video, "video")):
        if pixels is None:
            continue
        if vision_encoder is None:
            raise ValueError(f"{what} input needs the checkpoint's vision encoder (thinker.visual), absent here")
        if grid is None:
            raise ValueError(f"{what} input needs its {what}_grid_thw")
        visual, deepstack = vision_encoder(pixels, grid)
        _scatter(embeds, ids == token, visual, what)
        visual_masks.append(ids == token)
        deepstacks.append(deepstack)
    positions = prompt_positions(ids, media, config, vision_encoder)
    return PromptInputs(embeds, positions, _joint_deepstack(visual_masks, deepstacks))


def prompt_positions(ids: torch.Tensor, media: MediaInputs, config: OmniConfig, vision_encoder) -> torch.Tensor:
    if not media.has_visual and not media.use_audio_in_video:
        return torch.arange(ids.numel(), device=ids.device).view(1, 1, -1).expand(3, 1, -1)
    merge = vision_encoder.cfg.spatial_merge_size if vision_encoder is not None else 2
    positions, _ = rope_positions(ids, config.tokens, config.position_id_per_seconds, merge,
                                  image_grid_thw=media.image_grid_thw, video_grid_thw=media.video_grid_thw,
                                  video_second_per_grid=media.video_second_per_grid,
                                  use_audio_in_video=media.use_audio_in_video)
    return positions.to(ids.device)


def _joint_deepstack(masks: list[torch.Tensor], deepstacks: list[list[torch.Tensor]]) -> Deepstack | None:
    # Images and videos share one mask; their features interleave in prompt order (the reference's joint layout).
    if not masks:
        return None
    if len(masks) == 1:
        return Deepstack(masks[0], deepstacks[0])
    joint = masks[0] | masks[1]
    first_in_joint = masks[0][joint]
    features = []
    for image_feature, video_feature in zip(*deepstacks):
        merged = image_feature.new_zeros(int(joint.sum()), image_feature.shape[-1])
        merged[first_in_joint] = image_feature
        merged[~first_in_joint] = video_feature
        features.append(merged)
    return Deepstack(joint, features)


def talker_positions(ids: torch.Tensor, media: MediaInputs, config: OmniConfig, vision_encoder) -> torch.Tensor:
    """Positions of the talker's prefill: its user part (ids as in the prompt) then 9 assistant slots, laid out
    like a prompt whose assistant slots are text (the reference runs get_rope_index on these ids)."""
    talker_ids = torch.cat([ids[user_positions(ids, config.tokens)],
                            torch.full((9,), config.tokens.tts_pad, dtype=ids.dtype, device=ids.device)])
    return prompt_positions(talker_ids, media, config, vision_encoder)
