"""Model configuration read from a checkpoint's ``config.json``, as the released Qwen3-Omni writes it.

Accepts both spellings of the rotary settings: the release's ``rope_theta`` + ``rope_scaling`` (written by
transformers 4.x) and transformers 5's ``rope_parameters``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class MoeTextConfig:
    """A Qwen3 MoE decoder: the thinker's text model (and, with a shared expert, the talker's)."""
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0  # the talker's always-on expert; 0 = none

    def is_moe_layer(self, layer: int) -> bool:
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_dict(cls, d: dict) -> MoeTextConfig:
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 1e6))
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads", heads),
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            intermediate_size=d.get("intermediate_size", 0), moe_intermediate_size=d.get("moe_intermediate_size", 0),
            num_experts=d.get("num_experts", d.get("num_local_experts", 0)),
            num_experts_per_tok=d.get("num_experts_per_tok", 0),
            norm_topk_prob=bool(d.get("norm_topk_prob", False)), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            decoder_sparse_step=d.get("decoder_sparse_step", 1), mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
            shared_expert_intermediate_size=d.get("shared_expert_intermediate_size") or 0,
        )


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids of the chat template and the multimodal placeholders (released values as defaults)."""
    im_start: int = 151644
    im_end: int = 151645
    system: int = 8948
    user: int = 872
    assistant: int = 77091
    tts_pad: int = 151671
    tts_bos: int = 151672
    tts_eos: int = 151673
    audio_start: int = 151669
    audio: int = 151675
    image: int = 151655
    video: int = 151656
    vision_start: int = 151652

    @classmethod
    def from_dicts(cls, top: dict, thinker: dict) -> SpecialTokens:
        pick = lambda d, key, default: d.get(key, default) if d.get(key) is not None else default  # noqa: E731
        base = cls()
        return cls(
            im_start=pick(top, "im_start_token_id", base.im_start), im_end=pick(top, "im_end_token_id", base.im_end),
            system=pick(top, "system_token_id", base.system), user=pick(top, "user_token_id", base.user),
            assistant=pick(top, "assistant_token_id", base.assistant),
            tts_pad=pick(top, "tts_pad_token_id", base.tts_pad), tts_bos=pick(top, "tts_bos_token_id", base.tts_bos),
            tts_eos=pick(top, "tts_eos_token_id", base.tts_eos),
            audio_start=pick(thinker, "audio_start_token_id", base.audio_start),
            audio=pick(thinker, "audio_token_id", base.audio), image=pick(thinker, "image_token_id", base.image),
            video=pick(thinker, "video_token_id", base.video),
            vision_start=pick(thinker, "vision_start_token_id", base.vision_start),
        )


@dataclass(frozen=True)
class TalkerConfig:
    """The talker (MoE decoder over codebook 0), its code predictor (dense, codebooks 1..15) and the codec ids."""
    text: MoeTextConfig
    code_predictor: MoeTextConfig
    num_code_groups: int
    accept_hidden_layer: int   # index into the thinker's hidden states: output of layer accept_hidden_layer - 1
    thinker_hidden_size: int
    projection_size: int       # inner width of text_projection / hidden_projection
    codec_eos: int
    codec_pad: int
    codec_bos: int
    codec_nothink: int
    codec_think_bos: int
    codec_think_eos: int
    speakers: dict[str, int]
    spatial_merge_size: int = 2

    @classmethod
    def from_dict(cls, d: dict) -> TalkerConfig:
        text, predictor = d.get("text_config"), d.get("code_predictor_config")
        if not isinstance(text, dict) or not isinstance(predictor, dict):
            raise ValueError("talker_config lacks text_config or code_predictor_config")
        speakers = {name.lower(): int(i) for name, i in (d.get("speaker_id") or {}).items()}
        return cls(
            text=MoeTextConfig.from_dict(text), code_predictor=MoeTextConfig.from_dict(predictor),
            num_code_groups=d.get("num_code_groups", 16), accept_hidden_layer=d.get("accept_hidden_layer", 24),
            thinker_hidden_size=d.get("thinker_hidden_size", 2048),
            projection_size=text.get("intermediate_size", 2048), codec_eos=d.get("codec_eos_token_id", 2150),
            codec_pad=d.get("codec_pad_id", 2148), codec_bos=d.get("codec_bos_id", 2149),
            codec_nothink=d.get("codec_nothink_id", 2155), codec_think_bos=d.get("codec_think_bos_id", 2156),
            codec_think_eos=d.get("codec_think_eos_id", 2157), speakers=speakers,
            spatial_merge_size=d.get("spatial_merge_size", 2),
        )

    def speaker_id(self, name: str) -> int:
        if name.lower() not in self.speakers:
            known = ", ".join(sorted(self.speakers)) or "none"
            raise ValueError(f"unknown speaker {name!r}: this checkpoint has {known}")
        return self.speakers[name.lower()]


@dataclass(frozen=True)
class OmniConfig:
    thinker_text: MoeTextConfig
    tokens: SpecialTokens
    position_id_per_seconds: float = 13.0
    eos_token_ids: tuple[int, ...] = ()
    talker: TalkerConfig | None = None        # None: a text-only checkpoint
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict, generation: dict | None = None) -> OmniConfig:
        thinker = d.get("thinker_config")
        if not isinstance(thinker, dict) or not isinstance(thinker.get("text_config"), dict):
            raise ValueError("config.json has no thinker_config.text_config: not a Qwen3-Omni checkpoint")
        tokens = SpecialTokens.from_dicts(d, thinker)
        eos = (generation or {}).get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else (tokens.im_end,)
        talker = d.get("talker_config") if d.get("enable_audio_output", True) else None
        return cls(thinker_text=MoeTextConfig.from_dict(thinker["text_config"]), tokens=tokens,
                   position_id_per_seconds=float(thinker.get("position_id_per_seconds", 13)),
                   eos_token_ids=eos_ids, talker=TalkerConfig.from_dict(talker) if talker else None, raw=d)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> OmniConfig:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {path} does not exist")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        try:
            config = json.loads(config_file.read_text())
            generation_file = path / "generation_config.json"
            generation = json.loads(generation_file.read_text()) if generation_file.is_file() else None
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file.parent}: malformed JSON config: {e}") from e
        return cls.from_dict(config, generation)
