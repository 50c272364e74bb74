"""Malformed files on disk (config.json, the shard index, images, audio) get a one-line error naming the file and the
problem, a ValueError or FileNotFoundError, never a traceback from deep inside a library."""
import copy
import json
import re
import shutil

import numpy as np
import pytest
from hf_checkpoints import omni_config_dict
from safetensors.torch import load_file, save_file

from omni_runtime import OmniModel
from omni_runtime.chat import prepare_inputs
from omni_runtime.cli import main
from omni_runtime.config import OmniConfig, SpecialTokens
from omni_runtime.loader import INDEX_FILE
from omni_runtime.preprocess.audio import MAX_SECONDS
from omni_runtime.preprocess.vision import preprocess_image

soundfile = pytest.importorskip("soundfile")   # a runtime dependency; absent on some GPU images

TOKENS = SpecialTokens()


def q(path) -> str:
    """A path as a regular expression matching it."""
    return re.escape(str(path))


# ---- config.json ---------------------------------------------------------------------------------------------------

def write_config(folder, config, generation=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def damaged(path: str, value=None, delete: bool = False) -> dict:
    """omni_config_dict() with the field at the dotted ``path`` set to ``value`` (or deleted)."""
    config = copy.deepcopy(omni_config_dict())
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    if delete:
        del node[leaf]
    else:
        node[leaf] = value
    return config


def test_a_good_config_parses_and_nulls_mean_defaults(tmp_path):
    config = damaged("thinker_config.text_config.head_dim", None)       # transformers writes unset fields as null
    config["talker_config"]["text_config"]["shared_expert_intermediate_size"] = None
    parsed = OmniConfig.from_pretrained(write_config(tmp_path, config, {"eos_token_id": [151645, 151643]}))
    assert parsed.thinker_text.head_dim == 64 // 4 and parsed.thinker_text.vocab_size == 152064
    assert parsed.talker.text.shared_expert_intermediate_size == 0
    assert parsed.eos_token_ids == (151645, 151643) and parsed.talker.speakers["ethan"] == 2302


@pytest.mark.parametrize("path, value, delete", [
    ("thinker_config.text_config.vocab_size", None, True),
    ("thinker_config.text_config.hidden_size", "64", False),
    ("thinker_config.text_config.hidden_size", 64.0, False),
    ("thinker_config.text_config.num_hidden_layers", True, False),
    ("thinker_config.text_config.num_attention_heads", 0, False),
    ("thinker_config.text_config.num_key_value_heads", -2, False),
    ("thinker_config.text_config.num_experts", "8", False),
    ("thinker_config.text_config.decoder_sparse_step", 0, False),
    ("thinker_config.text_config.mlp_only_layers", [0, "1"], False),
    ("thinker_config.text_config.rms_norm_eps", "tiny", False),
    ("thinker_config.text_config.rope_parameters", [1, 2], False),
    ("thinker_config.text_config.rope_parameters.mrope_section", [4, 4], False),
    ("thinker_config.text_config.rope_parameters.rope_theta", -1, False),
    ("thinker_config.position_id_per_seconds", "13", False),
    ("thinker_config.image_token_id", -1, False),
    ("thinker_config.audio_config", [1, 2], False),
    ("im_end_token_id", "151645", False),
    ("talker_config", [1, 2], False),
    ("talker_config.num_code_groups", 0, False),
    ("talker_config.speaker_id.ethan", "x", False),
    ("talker_config.text_config.hidden_size", None, True),
    ("talker_config.code_predictor_config.vocab_size", 2048.5, False),
    ("code2wav_config", "small", False),
    ("thinker_config.text_config.norm_topk_prob", "false", False),   # bool("false") would be True
    ("talker_config.text_config.norm_topk_prob", 1, False),
])
def test_malformed_field_is_named(tmp_path, path, value, delete):
    folder = write_config(tmp_path, damaged(path, value, delete))
    with pytest.raises(ValueError, match=f"config.json: missing or malformed field {re.escape(path)}:"):
        OmniModel.from_pretrained(folder)


@pytest.mark.parametrize("where, fields, message", [
    ("thinker_config.text_config", dict(num_attention_heads=6, num_key_value_heads=4), "not a multiple of"),
    ("thinker_config.text_config", dict(head_dim=15), "head_dim=15 is odd"),
    ("thinker_config.text_config", dict(num_experts_per_tok=0), "num_experts_per_tok=0 must be between 1"),
    ("talker_config.text_config", dict(num_experts=4, num_experts_per_tok=6), "num_experts_per_tok=6 must be"),
    ("thinker_config.text_config", dict(moe_intermediate_size=0), "MoE layers need moe_intermediate_size"),
    ("thinker_config.text_config", dict(mlp_only_layers=[0], intermediate_size=0), "dense layers .* need"),
    ("talker_config.code_predictor_config", dict(intermediate_size=0), "dense layers .* need"),
    ("talker_config", dict(accept_hidden_layer=9), "accept_hidden_layer=9 needs a thinker of at least"),
    ("talker_config", dict(spatial_merge_size=4), "spatial_merge_size=4 differs from thinker_config.vision_config"),
])
def test_fields_that_do_not_fit_together_are_named(tmp_path, where, fields, message):
    config = copy.deepcopy(omni_config_dict())
    node = config
    for key in where.split("."):
        node = node[key]
    node.update(fields)
    with pytest.raises(ValueError, match=f"config.json: inconsistent {re.escape(where)}: .*{message}"):
        OmniModel.from_pretrained(write_config(tmp_path, config))


def test_config_that_is_not_an_object(tmp_path):
    with pytest.raises(ValueError, match="config.json: expected a JSON object at the top level, got list"):
        OmniModel.from_pretrained(write_config(tmp_path, "[1, 2]"))


def test_config_that_is_not_text(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="config.json: malformed JSON"):
        OmniModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("generation, message", [
    ([1, 2], "expected a JSON object"),
    ({"eos_token_id": "151645"}, "malformed field eos_token_id"),
    ({"eos_token_id": [151645, None]}, "malformed field eos_token_id"),
])
def test_malformed_generation_config_is_named(tmp_path, generation, message):
    write_config(tmp_path, omni_config_dict())
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    with pytest.raises(ValueError, match=f"generation_config.json: .*{message}"):
        OmniConfig.from_pretrained(tmp_path)


def test_cli_prints_a_malformed_config_as_one_line(tmp_path, capsys):
    folder = write_config(tmp_path, damaged("thinker_config.text_config.vocab_size", delete=True))
    assert main(["generate", "--model", str(folder), "--ids", "1,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "thinker_config.text_config.vocab_size" in err and "config.json" in err


# ---- shards and the index ------------------------------------------------------------------------------------------

def tiny_text_config() -> dict:
    from omni_runtime.demo import DEMO_CONFIG
    config = {k: v for k, v in copy.deepcopy(DEMO_CONFIG).items() if k not in ("talker_config", "code2wav_config")}
    config["thinker_config"]["text_config"].update(
        vocab_size=1024, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256)
    config["thinker_config"]["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 3]
    return config


@pytest.fixture(scope="module")
def tiny_sharded(tmp_path_factory):
    """A tiny text-only checkpoint in two shards with an index: (folder, weight map)."""
    from omni_runtime.demo import write_random_checkpoint
    folder = write_random_checkpoint(tmp_path_factory.mktemp("tiny"), tiny_text_config())
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard)
        weight_map |= dict.fromkeys(keys, shard)
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, weight_map


def test_sharded_tiny_checkpoint_loads(tiny_sharded):
    folder, _ = tiny_sharded
    assert len(OmniModel.from_pretrained(folder).generate([1, 2, 3], max_new_tokens=2).text_ids) == 2


def test_index_naming_the_wrong_shard(tiny_sharded, tmp_path):
    source, weight_map = tiny_sharded
    folder = shutil.copytree(source, tmp_path / "ckpt")
    key = "thinker.model.norm.weight"
    wrong = next(s for s in set(weight_map.values()) if s != weight_map[key])
    (folder / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map | {key: wrong}}))
    with pytest.raises(ValueError, match=f"{INDEX_FILE} maps tensor {key} to shard {wrong}, which does not contain"):
        OmniModel.from_pretrained(folder)


@pytest.mark.parametrize("index", [{"weight_map": [1, 2]}, {"weight_map": {"thinker.model.norm.weight": 3}}, [1]])
def test_malformed_index(tiny_sharded, tmp_path, index):
    folder = shutil.copytree(tiny_sharded[0], tmp_path / "ckpt")
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{INDEX_FILE}: not a valid safetensors index"):
        OmniModel.from_pretrained(folder)


# ---- images --------------------------------------------------------------------------------------------------------

@pytest.fixture
def png(tmp_path):
    from PIL import Image
    path = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
    return path


def bad_image(tmp_path, png, kind):
    if kind == "truncated":
        data = png.read_bytes()
        (tmp_path / "bad.png").write_bytes(data[: len(data) // 2])
    elif kind == "not an image":
        (tmp_path / "bad.png").write_text("this is not an image\n" * 20)
    else:  # a valid signature followed by garbage chunks
        (tmp_path / "bad.png").write_bytes(png.read_bytes()[:33] + bytes(range(256)) * 4)
    return tmp_path / "bad.png"


@pytest.mark.parametrize("kind", ["truncated", "not an image", "garbage chunks"])
def test_undecodable_image(tmp_path, png, kind):
    path = bad_image(tmp_path, png, kind)
    with pytest.raises(ValueError, match=f"cannot decode image file {q(path)}"):
        preprocess_image(path)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text_ids", "ids": [1]}]}]
    with pytest.raises(ValueError, match=f"message 0 part 0 \\(image\\): cannot decode image file {q(path)}"):
        prepare_inputs(messages, None, TOKENS)


def test_missing_image_and_directory(tmp_path, png):
    with pytest.raises(FileNotFoundError, match=f"image file {q(tmp_path / 'nope.png')} does not exist"):
        preprocess_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match=f"image path {q(tmp_path)} is a directory"):
        preprocess_image(str(tmp_path))
    pixels, grid = preprocess_image(png)          # a good image next to them still works
    assert grid.tolist() == [[1, 4, 4]] and pixels.shape == (16, 3 * 2 * 16 * 16)


def test_truncated_pil_image_object(tmp_path, png):
    from PIL import Image
    path = bad_image(tmp_path, png, "truncated")
    with Image.open(path) as image, pytest.raises(ValueError, match="cannot decode the PIL image"):
        preprocess_image(image)


# ---- audio ---------------------------------------------------------------------------------------------------------

def audio_message(path):
    return [{"role": "user", "content": [{"type": "audio", "audio": str(path)}, {"type": "text_ids", "ids": [1]}]}]


def no_reading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the file was read before its header was checked")
    monkeypatch.setattr(soundfile, "read", refuse)


def test_over_long_audio_is_refused_from_its_header(tmp_path, monkeypatch):
    # 41 minutes at 8 Hz: the header alone shows it is over the limit; the samples must not be read
    path = tmp_path / "long.wav"
    soundfile.write(path, np.zeros((8 * (MAX_SECONDS + 60), 2), dtype=np.float32), 8)
    no_reading(monkeypatch)
    message = f"message 0 part 0 \\(audio\\): audio file {q(path)}: audio too long: 2460.0 s"
    with pytest.raises(ValueError, match=message):
        prepare_inputs(audio_message(path), None, TOKENS)


def test_audio_with_too_many_channels_is_refused_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "nine.wav"
    soundfile.write(path, np.zeros((16000, 9), dtype=np.float32), 16000)
    no_reading(monkeypatch)
    with pytest.raises(ValueError, match=f"audio file {q(path)} has 9 channels, at most 8"):
        prepare_inputs(audio_message(path), None, TOKENS)


def test_bad_audio_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=f"audio path {q(tmp_path)} is a directory"):
        prepare_inputs(audio_message(tmp_path), None, TOKENS)
    with pytest.raises(FileNotFoundError, match=f"audio file {q(tmp_path / 'nope.wav')} does not exist"):
        prepare_inputs(audio_message(tmp_path / "nope.wav"), None, TOKENS)
    (tmp_path / "text.wav").write_text("not audio at all\n" * 50)
    with pytest.raises(ValueError, match=f"cannot decode audio file {q(tmp_path / 'text.wav')}"):
        prepare_inputs(audio_message(tmp_path / "text.wav"), None, TOKENS)
    soundfile.write(tmp_path / "short.wav", np.zeros(50, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match=f"audio file {q(tmp_path / 'short.wav')}: audio too short"):
        prepare_inputs(audio_message(tmp_path / "short.wav"), None, TOKENS)
    soundfile.write(tmp_path / "nan.wav", np.full(1600, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match=f"audio file {q(tmp_path / 'nan.wav')}: waveform contains NaN"):
        prepare_inputs(audio_message(tmp_path / "nan.wav"), None, TOKENS)
    soundfile.write(tmp_path / "good.wav", np.zeros(16000, dtype=np.float32), 16000)   # still fine next to them
    assert prepare_inputs(audio_message(tmp_path / "good.wav"), None, TOKENS)["input_features"].shape == (1, 128, 100)


def test_cli_prints_bad_media_as_one_line(tiny_sharded, tmp_path, png, capsys):
    folder, _ = tiny_sharded
    bad = bad_image(tmp_path, png, "truncated")
    assert main(["generate", "--model", str(folder), "--image", str(bad), "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"cannot decode image file {bad}" in err
    assert main(["generate", "--model", str(folder), "--audio", str(tmp_path), "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is a directory" in err


def test_a_sample_rate_beside_a_file_must_agree_with_it(tmp_path):
    soundfile.write(tmp_path / "a.wav", np.zeros(8000, dtype=np.float32), 8000)
    part = {"type": "audio", "audio": str(tmp_path / "a.wav")}
    message = [{"role": "user", "content": [{**part, "sample_rate": 16000}]}]
    with pytest.raises(ValueError, match="is at 8000 Hz, not the 'sample_rate' 16000"):
        prepare_inputs(message, None, TOKENS)
    message = [{"role": "user", "content": [{**part, "sample_rate": 8000}]}]
    assert prepare_inputs(message, None, TOKENS)["input_features"].shape == (1, 128, 100)
    soundfile.write(tmp_path / "slow.wav", np.zeros(800, dtype=np.float32), 1000)   # 1 kHz: not a speech rate
    with pytest.raises(ValueError, match="slow.wav: sample_rate 1000 Hz is outside the supported 4-384 kHz"):
        prepare_inputs(audio_message(tmp_path / "slow.wav"), None, TOKENS)
