"""Model configuration read from a checkpoint's ``config.json``, as the released Qwen3-Omni writes it.

Accepts both spellings of the rotary settings: the release's ``rope_theta`` + ``rope_scaling`` (written by
transformers 4.x) and transformers 5's ``rope_parameters``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_REQUIRED = object()


def _malformed(where: str, key: str, problem: str) -> ValueError:
    return ValueError(f"missing or malformed field {_join(where, key)}: {problem}")


def _get(d: dict, key: str, where: str, default: Any) -> Any:
    """``d[key]``; null counts as absent (transformers writes unset fields as null)."""
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise _malformed(where, key, "not present")
        return default
    return value


def _int(d: dict, key: str, where: str, default: Any = _REQUIRED, minimum: int = 1) -> int:
    """An integer field (not a bool, not a float) of at least ``minimum``: 1 for sizes, 0 for ids and counts."""
    value = _get(d, key, where, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _malformed(where, key, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _positive_float(d: dict, key: str, where: str, default: Any = _REQUIRED) -> float:
    value = _get(d, key, where, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise _malformed(where, key, f"expected a positive number, got {value!r}")
    return float(value)


def _bool(d: dict, key: str, where: str, default: Any = _REQUIRED) -> bool:
    """A JSON true/false (``bool("false")`` would be True: strings and numbers are refused)."""
    value = _get(d, key, where, default)
    if not isinstance(value, bool):
        raise _malformed(where, key, f"expected true or false, got {value!r}")
    return value


def _int_list(d: dict, key: str, where: str, default: Any = _REQUIRED, length: int | None = None) -> tuple[int, ...]:
    value = _get(d, key, where, default)
    if (not isinstance(value, (list, tuple)) or (length is not None and len(value) != length)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        count = f"{length} " if length is not None else ""
        raise _malformed(where, key, f"expected a list of {count}non-negative integers, got {value!r:.80}")
    return tuple(value)


def _dict(d: dict, key: str, where: str, default: Any = _REQUIRED) -> dict:
    value = _get(d, key, where, default)
    if not isinstance(value, dict):
        raise _malformed(where, key, f"expected a JSON object, got {type(value).__name__}")
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _read_json_object(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: malformed JSON config: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object at the top level, got {type(value).__name__}")
    return value


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

    def check(self, where: str) -> None:
        """Fields that are each well formed but do not fit together; ``where`` names the config in the error."""
        problems = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} is odd: rotary embeddings rotate pairs of dimensions")
        moe_layers = [layer for layer in range(self.num_hidden_layers) if self.is_moe_layer(layer)]
        if moe_layers and not 1 <= self.num_experts_per_tok <= self.num_experts:
            problems.append(f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                            f"num_experts={self.num_experts}")
        if moe_layers and not self.moe_intermediate_size:
            problems.append("MoE layers need moe_intermediate_size > 0")
        if len(moe_layers) < self.num_hidden_layers and not self.intermediate_size:
            problems.append("dense layers (mlp_only_layers, decoder_sparse_step or num_experts=0) need "
                            "intermediate_size > 0")
        if problems:
            raise ValueError(f"inconsistent {where}: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict, where: str = "text_config", norm_topk_prob: bool = True) -> MoeTextConfig:
        """``where``: the dict's place in config.json, for error messages naming a malformed field;
        ``norm_topk_prob``: what a config without the key means (transformers' class defaults: True for the
        thinker, False for the talker, whose release sets True)."""
        rope_key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
        rope = _dict(d, rope_key, where, default={})
        rope_where = _join(where, rope_key)
        theta = _positive_float(rope, "rope_theta", rope_where, _positive_float(d, "rope_theta", where, 1e6))
        hidden, heads = _int(d, "hidden_size", where), _int(d, "num_attention_heads", where)
        config = cls(
            vocab_size=_int(d, "vocab_size", where), hidden_size=hidden,
            num_hidden_layers=_int(d, "num_hidden_layers", where), num_attention_heads=heads,
            num_key_value_heads=_int(d, "num_key_value_heads", where, heads),
            head_dim=_int(d, "head_dim", where, max(1, hidden // heads)),
            intermediate_size=_int(d, "intermediate_size", where, 0, minimum=0),
            moe_intermediate_size=_int(d, "moe_intermediate_size", where, 0, minimum=0),
            num_experts=_int(d, "num_experts", where, _int(d, "num_local_experts", where, 0, minimum=0), minimum=0),
            num_experts_per_tok=_int(d, "num_experts_per_tok", where, 0, minimum=0),
            norm_topk_prob=_bool(d, "norm_topk_prob", where, norm_topk_prob),
            rms_norm_eps=_positive_float(d, "rms_norm_eps", where, 1e-6), rope_theta=theta,
            mrope_section=_int_list(rope, "mrope_section", rope_where, (24, 20, 20), length=3),
            max_position_embeddings=_int(d, "max_position_embeddings", where, 32768),
            decoder_sparse_step=_int(d, "decoder_sparse_step", where, 1),
            mlp_only_layers=_int_list(d, "mlp_only_layers", where, ()),
            shared_expert_intermediate_size=_int(d, "shared_expert_intermediate_size", where, 0, minimum=0),
        )
        config.check(where)
        return config


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
        base = cls()
        top_ids = dict(im_start="im_start_token_id", im_end="im_end_token_id", system="system_token_id",
                       user="user_token_id", assistant="assistant_token_id", tts_pad="tts_pad_token_id",
                       tts_bos="tts_bos_token_id", tts_eos="tts_eos_token_id")
        thinker_ids = dict(audio_start="audio_start_token_id", audio="audio_token_id", image="image_token_id",
                           video="video_token_id", vision_start="vision_start_token_id")
        ids = {name: _int(top, key, "", getattr(base, name), minimum=0) for name, key in top_ids.items()}
        ids |= {name: _int(thinker, key, "thinker_config", getattr(base, name), minimum=0)
                for name, key in thinker_ids.items()}
        return cls(**ids)


@dataclass(frozen=True)
class TalkerConfig:
    """The talker (MoE decoder over codebook 0), its code predictor (dense, codebooks 1..15) and the codec ids."""
    text: MoeTextConfig
    code_predictor: MoeTextConfig
    num_code_groups: int
    accept_hidden_layer: int   # index into the thinker's hidden states: output of layer accept_hidden_layer - 1
    #                            (the final-norm output when it is the thinker's layer count)
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
    position_id_per_seconds: float = 25.0   # its own get_rope_index's (the class default is 25, the release's 13)

    @classmethod
    def from_dict(cls, d: dict, where: str = "talker_config") -> TalkerConfig:
        text, predictor = d.get("text_config"), d.get("code_predictor_config")
        if not isinstance(text, dict) or not isinstance(predictor, dict):
            raise ValueError(f"{where} lacks text_config or code_predictor_config")
        speaker_ids = _dict(d, "speaker_id", where, default={})
        speakers = {name.lower(): _int(speaker_ids, name, _join(where, "speaker_id"), minimum=0)
                    for name in speaker_ids}
        codec = lambda key, default: _int(d, key, where, default, minimum=0)  # noqa: E731
        return cls(
            text=MoeTextConfig.from_dict(text, _join(where, "text_config"), norm_topk_prob=False),
            code_predictor=MoeTextConfig.from_dict(predictor, _join(where, "code_predictor_config")),
            num_code_groups=_int(d, "num_code_groups", where, 16),
            accept_hidden_layer=_int(d, "accept_hidden_layer", where, 24, minimum=0),
            thinker_hidden_size=_int(d, "thinker_hidden_size", where, 2048),
            projection_size=_int(text, "intermediate_size", _join(where, "text_config"), 2048),
            codec_eos=codec("codec_eos_token_id", 2150), codec_pad=codec("codec_pad_id", 2148),
            codec_bos=codec("codec_bos_id", 2149), codec_nothink=codec("codec_nothink_id", 2155),
            codec_think_bos=codec("codec_think_bos_id", 2156), codec_think_eos=codec("codec_think_eos_id", 2157),
            speakers=speakers, spatial_merge_size=_int(d, "spatial_merge_size", where, 2),
            position_id_per_seconds=_positive_float(d, "position_id_per_seconds", where, 25),
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
    position_id_per_seconds: float = 25.0   # the thinker's get_rope_index's (class default 25, the release's 13)
    eos_token_ids: tuple[int, ...] = ()
    talker: TalkerConfig | None = None        # None: a text-only checkpoint
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict, generation: dict | None = None) -> OmniConfig:
        """``d``: config.json's contents, ``generation``: generation_config.json's. A missing or malformed field is
        a ValueError naming it."""
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
        thinker = d.get("thinker_config")
        if not isinstance(thinker, dict) or not isinstance(thinker.get("text_config"), dict):
            raise ValueError("no thinker_config.text_config object: not a Qwen3-Omni checkpoint's config")
        for key in ("audio_config", "vision_config"):              # parsed by the encoders, which need objects
            _dict(thinker, key, "thinker_config", default={})
        _dict(d, "code2wav_config", "", default={})
        tokens = SpecialTokens.from_dicts(d, thinker)
        talker = _dict(d, "talker_config", "", default={}) if d.get("enable_audio_output", True) else None
        config = cls(thinker_text=MoeTextConfig.from_dict(thinker["text_config"], "thinker_config.text_config"),
                     tokens=tokens,
                     position_id_per_seconds=_positive_float(thinker, "position_id_per_seconds", "thinker_config", 25),
                     eos_token_ids=_eos_ids(generation, tokens.im_end),
                     talker=TalkerConfig.from_dict(talker) if talker else None, raw=d)
        layers = config.thinker_text.num_hidden_layers
        if config.talker is not None and config.talker.accept_hidden_layer > layers:
            # the talker reads the thinker's hidden state number accept_hidden_layer at audio/image/video tokens
            raise ValueError(f"inconsistent talker_config: accept_hidden_layer={config.talker.accept_hidden_layer} "
                             f"needs a thinker of at least that many layers, this one has {layers}")
        vision_merge = thinker.get("vision_config", {}).get("spatial_merge_size", 2)
        if config.talker is not None and config.talker.spatial_merge_size != vision_merge:
            # the talker lays out the thinker's image/video placeholders, one per merged patch
            raise ValueError(f"inconsistent talker_config: spatial_merge_size={config.talker.spatial_merge_size} "
                             f"differs from thinker_config.vision_config's {vision_merge}")
        return config

    @classmethod
    def from_pretrained(cls, path: str | Path) -> OmniConfig:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {path} does not exist")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        config = _read_json_object(config_file)
        generation_file = path / "generation_config.json"
        generation = _read_json_object(generation_file) if generation_file.is_file() else None
        try:
            _eos_ids(generation, 0)
        except ValueError as e:
            raise ValueError(f"{generation_file}: {e}") from e
        try:
            return cls.from_dict(config, generation)
        except ValueError as e:
            raise ValueError(f"{config_file}: {e}") from e


def _eos_ids(generation: dict | None, default: int) -> tuple[int, ...]:
    """generation_config.json's ``eos_token_id`` (one id or a list), else ``default``."""
    if generation is None or generation.get("eos_token_id") is None:
        return (default,)
    if isinstance(generation.get("eos_token_id"), list):
        return _int_list(generation, "eos_token_id", "")
    return (_int(generation, "eos_token_id", "", minimum=0),)
