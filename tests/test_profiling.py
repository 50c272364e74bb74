"""The NVTX ranges a profile shows: each pipeline stage opens and closes its own, nested as the calls are."""
import copy
from contextlib import contextmanager

import numpy as np
import nvtx
import pytest

from omni_runtime import OmniModel, SamplingParams
from omni_runtime.demo import DEMO_CONFIG
from omni_runtime.profiling import DOMAIN, stage_range

GREEDY = SamplingParams(temperature=0.0)


class Ranges:
    """Stands in for ``nvtx.annotate``: records ("push"/"pop", name), checks the domain and colour are given."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []

    @contextmanager
    def __call__(self, message, color=None, domain=None, **_):
        assert domain == DOMAIN and color is not None
        self.events.append(("push", message))
        try:
            yield
        finally:
            self.events.append(("pop", message))

    def names(self) -> list[str]:
        return [name for kind, name in self.events if kind == "push"]

    def check_nesting(self) -> list[tuple[str, str]]:
        """-> (outer, inner) pairs; every range closes, innermost first."""
        stack, pairs = [], set()
        for kind, name in self.events:
            if kind == "push":
                if stack:
                    pairs.add((stack[-1], name))
                stack.append(name)
            else:
                assert stack and stack.pop() == name, f"{name} closed out of order in {self.events}"
        assert not stack, f"ranges left open: {stack}"
        return sorted(pairs)


@pytest.fixture
def ranges(monkeypatch):
    recorder = Ranges()
    monkeypatch.setattr(nvtx, "annotate", recorder)
    return recorder


@pytest.fixture(scope="module")
def model():
    config = copy.deepcopy(DEMO_CONFIG)
    config["thinker_config"]["audio_config"] = dict(
        encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32, downsample_hidden_size=16,
        output_dim=config["thinker_config"]["text_config"]["hidden_size"])
    return OmniModel.random(config, encoders=True)


def audio_chat(seconds: float = 0.5) -> list[dict]:
    wave = np.random.default_rng(0).standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1
    return [{"role": "user", "content": [{"type": "audio", "audio": wave, "sample_rate": 16000},
                                         {"type": "text_ids", "ids": [9707, 11]}]}]


def test_a_stream_marks_every_stage(model, ranges):
    prompt = model.prepare(audio_chat())
    assert ranges.names() == ["preprocess"]
    events = list(model.stream(**prompt, max_new_tokens=4, eos_token_id=None, talker_max_new_tokens=6,
                               talker_sampling=GREEDY))
    assert any(e.audio is not None for e in events)
    names = ranges.names()
    assert names[:3] == ["preprocess", "audio encoder", "thinker prefill"]
    for stage in ("thinker decode", "talker prefill", "code predictor", "talker frame", "code2wav"):
        assert stage in names, f"no {stage!r} range in {names}"
    assert names.count("thinker decode") == 3          # 4 tokens: the prefill's, then 3 steps
    assert ranges.check_nesting() == []                # the single stream's stages follow one another


def test_the_engine_tick_holds_its_stages(model, ranges):
    engine = model.speech_engine(max_batch=2)
    options = dict(max_new_tokens=3, eos_token_id=None, talker_max_new_tokens=4, talker_sampling=GREEDY)
    engine.submit(model.prepare(audio_chat()), **options)
    engine.submit(model.prepare([{"role": "user", "content": [{"type": "text_ids", "ids": [5, 6]}]}]), **options)
    ticks = 0
    while engine.busy:
        engine.step()
        ticks += 1
    engine.close()
    names = ranges.names()
    assert names.count("engine tick") == ticks
    nested = ranges.check_nesting()
    assert ("engine tick", "audio encoder") in nested      # encoders run when the request is admitted
    for stage in ("thinker prefill", "thinker decode", "talker prefill", "talker frame", "code2wav"):
        assert ("engine tick", stage) in nested, f"{stage!r} not inside a tick: {nested}"
    assert {outer for outer, _ in nested} == {"engine tick"}


def test_an_exception_closes_its_range(ranges):
    with pytest.raises(ValueError):
        with stage_range("thinker prefill"):
            raise ValueError("bad")
    assert ranges.events == [("push", "thinker prefill"), ("pop", "thinker prefill")]


def test_ranges_run_on_the_real_nvtx():
    # no profiler attached: the nvtx package's no-op domain; the colours must be ones it knows without matplotlib
    for name in ("thinker decode", "talker frame", "code predictor", "code2wav", "audio encoder",
                 "vision encoder (image)", "preprocess", "capture decode step", "engine tick", "something else"):
        with stage_range(name):
            pass
