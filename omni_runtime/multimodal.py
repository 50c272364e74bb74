"""Multimodal prompts: encoder features written into the placeholder positions, TM-RoPE positions, DeepStack.

``generate``/``stream`` take the reference processor's names for media inputs (``MediaInputs``). Audio features go
to the ``<|audio_pad|>`` positions, image/video tokens to ``<|image_pad|>``/``<|video_pad|>``, in prompt order; the
vision encoder's DeepStack features are added after the first thinker layers at the visual positions. A placeholder
count that disagrees with the features is an error naming both.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from omni_runtime.config import OmniConfig, SpecialTokens
from omni_runtime.engine.talker_prompt import user_positions
from omni_runtime.models.audio_encoder import audio_token_count
from omni_runtime.positions import AUDIO_IN_VIDEO, IMAGE, VIDEO, prompt_segments, rope_positions
from omni_runtime.profiling import stage_range


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
        media = cls(**kwargs)
        media.check_types()
        return media

    def check_types(self) -> None:
        """What the processor returns: tensors (integer masks and grids, floating features), so that a wrong type
        is refused when a request is checked, not when its encoders run."""
        floating = ("input_features", "pixel_values", "pixel_values_videos")
        integer = ("feature_attention_mask", "image_grid_thw", "video_grid_thw")
        for name in floating + integer:
            value = getattr(self, name)
            if value is None:
                continue
            if not torch.is_tensor(value):
                raise ValueError(f"{name} must be a torch tensor, got {type(value).__name__}")
            if value.is_floating_point() != (name in floating) or value.is_complex():
                raise ValueError(f"{name} must be {'a floating point' if name in floating else 'an integer'} "
                                 f"tensor, got {value.dtype}")
        if not isinstance(self.use_audio_in_video, (bool, np.bool_)):
            raise ValueError(f"use_audio_in_video must be a bool, got {self.use_audio_in_video!r}")
        self.use_audio_in_video = bool(self.use_audio_in_video)

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


def audio_lengths(media: MediaInputs) -> list[int]:
    """The mel frames of every audio (its feature_attention_mask's count)."""
    features, mask = media.input_features, media.feature_attention_mask
    if mask is None or features.dim() != 3 or mask.shape != (features.shape[0], features.shape[2]):
        raise ValueError("input_features [n, mel, frames] needs feature_attention_mask [n, frames], got "
                         f"{tuple(features.shape)} and {None if mask is None else tuple(mask.shape)}")
    return mask.sum(dim=1).tolist()


def audio_features(media: MediaInputs, audio_encoder) -> torch.Tensor:
    """[N_audio_tokens, H] for every audio, in order."""
    features = media.input_features
    return audio_encoder([features[i, :, :n] for i, n in enumerate(audio_lengths(media))])


def check_media(ids: torch.Tensor, media: MediaInputs, config: OmniConfig, audio_encoder, vision_encoder) -> None:
    """What ``build_prompt`` would find wrong with a prompt's media, found without running an encoder: an encoder
    the checkpoint lacks, features of the wrong shape, placeholder counts that disagree with the features (the
    same errors). Checked when a request is, so a server refuses it before any work starts."""
    tokens = config.tokens
    if media.has_audio:
        window = _audio_encoder(audio_encoder).cfg.n_window
        made = sum(audio_token_count(n, window) for n in audio_lengths(media))
        _check_placeholders(ids == tokens.audio, made, "audio")
    for pixels, grid, token, what in _visual_inputs(media, tokens, vision_encoder):
        grids = vision_encoder.check_input(pixels, grid, finite=False)   # NaNs: when it runs, not a second pass
        merge = vision_encoder.cfg.spatial_merge_size
        _check_placeholders(ids == token, sum(t * h * w for t, h, w in grids) // merge**2, what)
    thinker_positions(ids, media, config, vision_encoder)   # groups against grids, video seconds, audio in video


def _audio_encoder(audio_encoder):
    if audio_encoder is None:
        raise ValueError("audio input needs the checkpoint's audio encoder (thinker.audio_tower), absent here")
    return audio_encoder


def _visual_inputs(media: MediaInputs, tokens: SpecialTokens, vision_encoder):
    """(pixels, grid_thw, placeholder token, "image"/"video") of the media given, once the encoder and the grid
    they need are known to be there."""
    for pixels, grid, token, what in ((media.pixel_values, media.image_grid_thw, tokens.image, "image"),
                                      (media.pixel_values_videos, media.video_grid_thw, tokens.video, "video")):
        if pixels is None:
            continue
        if vision_encoder is None:
            raise ValueError(f"{what} input needs the checkpoint's vision encoder (thinker.visual), absent here")
        if grid is None:
            raise ValueError(f"{what} input needs its {what}_grid_thw")
        yield pixels, grid, token, what


def _check_placeholders(where: torch.Tensor, features: int, what: str) -> None:
    if int(where.sum()) != features:
        raise ValueError(f"the prompt has {int(where.sum())} {what} placeholder tokens but the {what} input gives "
                         f"{features} features")


def _scatter(embeds: torch.Tensor, where: torch.Tensor, values: torch.Tensor, what: str) -> None:
    _check_placeholders(where, values.shape[0], what)
    embeds[0, where] = values.to(embeds.dtype)


def build_prompt(ids: torch.Tensor, media: MediaInputs, config: OmniConfig, embed_tokens, audio_encoder,
                 vision_encoder) -> PromptInputs:
    """ids: [P] -> the thinker's prefill inputs."""
    tokens = config.tokens
    embeds = embed_tokens(ids.view(1, -1))
    if media.has_audio:
        with stage_range("audio encoder"):
            audio = audio_features(media, _audio_encoder(audio_encoder))
        _scatter(embeds, ids == tokens.audio, audio, "audio")
    visual_masks, deepstacks = [], []
    for pixels, grid, token, what in _visual_inputs(media, tokens, vision_encoder):
        with stage_range(f"vision encoder ({what})"):
            visual, deepstack = vision_encoder(pixels, grid)
        _scatter(embeds, ids == token, visual, what)
        visual_masks.append(ids == token)
        deepstacks.append(deepstack)
    positions = thinker_positions(ids, media, config, vision_encoder)
    return PromptInputs(embeds, positions, _joint_deepstack(visual_masks, deepstacks))


def thinker_positions(ids: torch.Tensor, media: MediaInputs, config: OmniConfig, vision_encoder) -> torch.Tensor:
    merge = vision_encoder.cfg.spatial_merge_size if vision_encoder is not None else 2
    return prompt_positions(ids, media, config.tokens, config.position_id_per_seconds, merge)


def prompt_positions(ids: torch.Tensor, media: MediaInputs, tokens: SpecialTokens, position_id_per_seconds: float,
                     spatial_merge_size: int) -> torch.Tensor:
    """[3, 1, L] M-RoPE positions of a prompt, as get_rope_index lays them out with these two settings (the thinker
    and the talker each read their own config's)."""
    if not media.has_visual and not media.use_audio_in_video:
        return torch.arange(ids.numel(), device=ids.device).view(1, 1, -1).expand(3, 1, -1)
    positions, _ = rope_positions(ids, tokens, position_id_per_seconds, spatial_merge_size,
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


def talker_positions(ids: torch.Tensor, media: MediaInputs, config: OmniConfig) -> torch.Tensor:
    """Positions of the talker's prefill: its user part (ids as in the prompt) then 9 assistant slots, laid out
    like a prompt whose assistant slots are text (the reference runs get_rope_index on these ids). Only the user
    turns' images and videos are in it, so only their grids count (the reference passes all of them, and fails on
    an image in the system turn). The time scale and merge size are the talker config's, as the reference's."""
    user = user_positions(ids, config.tokens)
    talker_ids = torch.cat([ids[user], torch.full((9,), config.tokens.tts_pad, dtype=ids.dtype, device=ids.device)])
    return prompt_positions(talker_ids, user_turn_media(ids, user, media, config.tokens), config.tokens,
                            config.talker.position_id_per_seconds, config.talker.spatial_merge_size)


def user_turn_media(ids: torch.Tensor, user: torch.Tensor, media: MediaInputs, tokens: SpecialTokens) -> MediaInputs:
    """``media`` with the grids of the images and videos outside the user turns (at prompt positions not in
    ``user``) left out."""
    if not media.has_visual:
        return media
    in_user = set(user.tolist())
    segments = prompt_segments(ids.tolist(), tokens)
    images = [s.begin in in_user for s in segments if s.kind == IMAGE]
    videos = [s.begin in in_user for s in segments if s.kind in (VIDEO, AUDIO_IN_VIDEO)]
    if all(images) and all(videos):
        return media

    def keep(rows, kept):
        if rows is None or len(kept) != len(rows):   # a count the positions refuse by name
            return rows
        return rows[torch.tensor(kept, dtype=torch.bool, device=rows.device)] if torch.is_tensor(rows) else \
            [r for r, k in zip(rows, kept) if k]

    return replace(media, image_grid_thw=keep(media.image_grid_thw, images),
                   video_grid_thw=keep(media.video_grid_thw, videos),
                   video_second_per_grid=keep(media.video_second_per_grid, videos))
