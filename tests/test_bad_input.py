"""Bad checkpoints and bad requests get an error that names the problem, and nothing else breaks."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from omni_runtime import OmniModel


@pytest.fixture
def checkpoint_copy(reference_checkpoint, tmp_path):
    """A private, sharded copy of the tiny checkpoint that a test may damage."""
    source, _ = reference_checkpoint(seed=7, max_shard_size="10MB")
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    return target


def shard_of(folder, key):
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OmniModel.from_pretrained(tmp_path / "nowhere")


def test_missing_config(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        OmniModel.from_pretrained(checkpoint_copy)


def test_missing_shard_is_named(checkpoint_copy):
    shard = shard_of(checkpoint_copy, "thinker.lm_head.weight")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        OmniModel.from_pretrained(checkpoint_copy)


def test_corrupt_shard_is_named(checkpoint_copy):
    shard = shard_of(checkpoint_copy, "thinker.model.norm.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{shard.name}.*corrupt"):
        OmniModel.from_pretrained(checkpoint_copy)


def test_pickle_only_checkpoint_is_refused(tmp_path, reference_checkpoint):
    source, _ = reference_checkpoint()
    shutil.copy(source / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded, never unpickled")
    with pytest.raises(ValueError, match="pickle"):
        OmniModel.from_pretrained(tmp_path)


def rewrite_single_file(folder, mutate):
    """Merge the shards into one model.safetensors after ``mutate(tensors)``."""
    from safetensors.torch import load_file
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink()
    mutate(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_shape_disagreeing_with_config(checkpoint_copy):
    key = "thinker.model.layers.1.self_attn.k_proj.weight"
    rewrite_single_file(checkpoint_copy, lambda t: t.__setitem__(key, t[key][:-1].contiguous()))
    with pytest.raises(ValueError, match=f"{key}.*shape"):
        OmniModel.from_pretrained(checkpoint_copy)


def test_unknown_tensor(checkpoint_copy):
    rewrite_single_file(checkpoint_copy, lambda t: t.__setitem__("thinker.model.layers.0.extra.weight",
                                                                 torch.zeros(3)))
    with pytest.raises(ValueError, match="unknown tensors.*extra"):
        OmniModel.from_pretrained(checkpoint_copy)


def test_saved_rotary_inv_freq_is_skipped_as_transformers_skips_it(checkpoint_copy):
    # some exports persist the rotary buffers; they are derived from the config, not weights. Garbage values show
    # they are not read: the greedy answer is the untouched checkpoint's.
    from transformers import Qwen3OmniMoeForConditionalGeneration
    prompt = [151644, 872, 198, 1000, 1001, 151645, 198, 151644, 77091, 198]
    expected = OmniModel.from_pretrained(checkpoint_copy).generate(prompt, max_new_tokens=4).text_ids
    stray = ("thinker.model.rotary_emb.inv_freq", "thinker.model.layers.0.self_attn.rotary_emb.inv_freq",
             "talker.model.rotary_emb.inv_freq", "talker.code_predictor.model.rotary_emb.inv_freq")
    rewrite_single_file(checkpoint_copy, lambda t: t.update({key: torch.full((8,), 7.0) for key in stray}))
    Qwen3OmniMoeForConditionalGeneration.from_pretrained(checkpoint_copy)   # transformers loads past them too
    assert OmniModel.from_pretrained(checkpoint_copy).generate(prompt, max_new_tokens=4).text_ids == expected


def test_checkpoint_without_speech_tensors_loads_text_only(checkpoint_copy):
    # the config still has talker_config and enable_audio_output; no talker.*/code2wav.* tensors -> text-only
    prompt = [151644, 872, 198, 1000, 1001, 151645, 198, 151644, 77091, 198]
    expected = OmniModel.from_pretrained(checkpoint_copy).generate(prompt, max_new_tokens=4).text_ids
    rewrite_single_file(checkpoint_copy, lambda t: [t.pop(key) for key in list(t)
                                                    if key.startswith(("talker.", "code2wav."))])
    model = OmniModel.from_pretrained(checkpoint_copy)
    assert model.talker is None and model.generate(prompt, max_new_tokens=4).text_ids == expected
    with pytest.raises(ValueError, match="holds no talker.* and code2wav.* tensors"):
        model.generate(prompt, max_new_tokens=2, return_audio=True)


def test_checkpoint_with_part_of_the_speech_tensors_is_refused(checkpoint_copy):
    rewrite_single_file(checkpoint_copy, lambda t: [t.pop(key) for key in list(t) if key.startswith("code2wav.")])
    with pytest.raises(ValueError, match="lacks .* tensors.*code2wav"):
        OmniModel.from_pretrained(checkpoint_copy)


def test_missing_expert(checkpoint_copy):
    key = "thinker.model.layers.0.mlp.experts.3.up_proj.weight"
    rewrite_single_file(checkpoint_copy, lambda t: t.pop(key))
    with pytest.raises(ValueError, match="lacks.*layers.0.mlp.experts.gate_up_proj"):
        OmniModel.from_pretrained(checkpoint_copy)


def test_not_a_qwen3_omni_config(checkpoint_copy):
    (checkpoint_copy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="thinker_config"):
        OmniModel.from_pretrained(checkpoint_copy)


@pytest.fixture(scope="module")
def model(reference_checkpoint):
    folder, _ = reference_checkpoint()
    return OmniModel.from_pretrained(folder, max_seq_len=64)


@pytest.mark.parametrize("ids, message", [
    ([], "empty"),
    (torch.zeros(2, 3, dtype=torch.long), "1-D or \\[1, T\\]"),
    ([5, 152064], "outside the vocabulary"),
    ([-1, 5], "outside the vocabulary"),
    (torch.tensor([1.0, 2.0]), "integer"),
])
def test_bad_prompts(model, ids, message):
    with pytest.raises(ValueError, match=message):
        model.generate(ids, max_new_tokens=2)


def test_prompt_beyond_cache_and_model_still_works_after(model):
    with pytest.raises(ValueError, match="64 positions"):
        model.generate(list(range(100, 160)), max_new_tokens=5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([1, 2, 3], max_new_tokens=0)
    assert len(model.generate(list(range(100, 159)), max_new_tokens=5).text_ids) == 5


def test_cache_size_beyond_model_positions(reference_checkpoint):
    folder, _ = reference_checkpoint()
    with pytest.raises(ValueError, match="max_seq_len"):
        OmniModel.from_pretrained(folder, max_seq_len=10**9)


def test_audio_output_without_a_talker_is_refused_clearly(tmp_path):
    from omni_runtime.demo import DEMO_CONFIG, write_random_checkpoint
    text_only = {k: v for k, v in DEMO_CONFIG.items() if k not in ("talker_config", "code2wav_config")}
    model = OmniModel.from_pretrained(write_random_checkpoint(tmp_path, text_only))
    with pytest.raises(ValueError, match="return_audio=True needs a checkpoint with a talker"):
        model.generate([1, 2, 3], max_new_tokens=2, return_audio=True)
    assert len(model.generate([1, 2, 3], max_new_tokens=2).text_ids) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "tpu"}, "device='tpu' is not a torch device"),
    ({"device": "cuda"}, "device='cuda' but CUDA is not available"),
    ({"device": "cuda:7"}, "device='cuda:7' but"),
    ({"dtype": torch.int8}, "dtype=torch.int8 must be a floating-point torch dtype"),
    ({"dtype": "int8"}, "dtype='int8' must be a floating-point torch dtype or one of float32, bfloat16, float16"),
])
def test_bad_device_or_dtype_is_named_before_loading(kwargs, message, monkeypatch):
    from omni_runtime.demo import DEMO_CONFIG
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=re.escape(message)):
        OmniModel.from_pretrained("never-read", **kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        OmniModel.random(DEMO_CONFIG, **kwargs)


def test_dtype_by_name(reference_checkpoint):
    folder, _ = reference_checkpoint()
    model = OmniModel.from_pretrained(folder, dtype="bfloat16", max_seq_len=16)
    assert model.dtype == torch.bfloat16 and model.thinker.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("ids", ["hello", b"hi", {"role": "user"}, ["a", "b"]])
def test_text_instead_of_ids_points_to_prepare(model, ids):
    with pytest.raises(ValueError, match=r"input_ids must be token ids \(a tensor or a list of ints\).*prepare\(\)"):
        model.generate(ids, max_new_tokens=2)


def test_sampling_must_be_sampling_params(model):
    loose = {"temperature": 0.5}
    with pytest.raises(ValueError, match="thinker_sampling must be a SamplingParams"):
        model.generate([1, 2, 3], max_new_tokens=2, thinker_sampling=loose)
    with pytest.raises(ValueError, match="thinker_sampling must be a SamplingParams"):
        model.generate_batch([[1, 2, 3]], max_new_tokens=2, thinker_sampling=loose)
    for name in ("talker_sampling", "code_predictor_sampling"):
        with pytest.raises(ValueError, match=f"{name} must be a SamplingParams"):
            model.generate([1, 2, 3], max_new_tokens=2, return_audio=True, **{name: loose})
    assert len(model.generate([1, 2, 3], max_new_tokens=2).text_ids) == 2


def test_busy_runners_raise_runner_busy_error(model):
    from omni_runtime.engine.lease import RunnerBusyError
    stream = model.stream([1, 2, 3], max_new_tokens=3, return_audio=False)
    next(stream)
    with pytest.raises(RunnerBusyError, match="in use by a stream"):
        model.generate([1, 2, 3], max_new_tokens=2)
    stream.close()
    assert len(model.generate([1, 2, 3], max_new_tokens=2).text_ids) == 2


def test_speech_engine_options_are_keyword_only(model):
    with pytest.raises(TypeError):
        model.speech_engine(2, 16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer, got 2.5"),
    (dict(max_new_tokens=None), "max_new_tokens must be an integer, got None"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(eos_token_id="x"), "eos_token_id must be a token id or a list of them"),
    (dict(eos_token_id=[5, 2.0]), "eos_token_id must be a token id or a list of them"),
    (dict(eos_token_id=1.5), "eos_token_id must be a token id or a list of them"),
    (dict(return_audio=True, speaker=None), "speaker must be a speaker's name, got None"),
    (dict(return_audio=True, talker_max_new_tokens=1.5), "talker_max_new_tokens must be an integer"),
])
def test_bad_generation_arguments_are_named(model, kwargs, message):
    # refused when the request is checked, by name (not a TypeError from deep inside, nor silently accepted)
    with pytest.raises(ValueError, match=message):
        model.generate([1, 2, 3], **{"max_new_tokens": 2, **kwargs})
    with pytest.raises(ValueError, match=message):
        model.generate_batch([[1, 2, 3]], **{"max_new_tokens": 2, **kwargs})
    assert model.generate([1, 2, 3], max_new_tokens=2, eos_token_id=[5, 6]).text_ids


def test_numpy_bools_pass_as_bools():
    import numpy as np

    from omni_runtime.multimodal import MediaInputs
    assert MediaInputs.from_kwargs({"use_audio_in_video": np.False_}).use_audio_in_video is False


@pytest.mark.parametrize("media, message", [
    (dict(input_features=[[0.0]], feature_attention_mask=torch.ones(1, 1, dtype=torch.long)),
     "input_features must be a torch tensor, got list"),
    (dict(input_features=torch.zeros(1, 128, 4), feature_attention_mask=torch.ones(1, 4)),
     "feature_attention_mask must be an integer tensor, got torch.float32"),
    (dict(pixel_values=torch.zeros(4, 1536, dtype=torch.long), image_grid_thw=torch.tensor([[1, 2, 2]])),
     "pixel_values must be a floating point tensor"),
    (dict(pixel_values=torch.zeros(4, 1536), image_grid_thw=[[1, 2, 2]]), "image_grid_thw must be a torch tensor"),
    (dict(use_audio_in_video="yes"), "use_audio_in_video must be a bool"),
])
def test_media_of_the_wrong_type_is_refused_when_checked(model, media, message):
    with pytest.raises(ValueError, match=message):
        model.generate([1, 2, 3], max_new_tokens=2, **media)
