"""CUDA-graph replay of the code predictor's frame equals its eager run, for changing inputs."""
import pytest
import torch

import omni_kernels as ok
from omni_runtime import OmniModel
from omni_runtime.sampling import Sampler, SamplingParams


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_code_predictor_graph_replays_like_eager(reference_checkpoint, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    folder, _ = reference_checkpoint()
    runner = OmniModel.from_pretrained(folder, device="cuda", dtype=dtype).talker_runner
    greedy = Sampler(SamplingParams(temperature=0.0), torch.device("cuda"))
    hidden_size = runner.cfg.text.hidden_size
    for seed in range(4):   # the first call captures, the others replay with new inputs
        generator = torch.Generator(device="cuda").manual_seed(seed)
        hidden = torch.randn(1, 1, hidden_size, device="cuda", generator=generator).to(dtype)
        code0 = torch.randint(0, 2048, (1,), device="cuda", generator=generator)
        with torch.inference_mode():
            codes, embed = runner.predict_residuals(hidden, code0, greedy)
            eager_codes, eager_embed = runner._predict(hidden, code0, greedy)
        assert runner.predictor_graph.graph is not None and not runner.predictor_graph.failed
        assert torch.equal(codes, eager_codes)
        torch.testing.assert_close(embed, eager_embed, atol=0, rtol=0)


@pytest.mark.gpu
def test_sampled_code_predictor_graph_draws_like_eager(reference_checkpoint):
    # A sampled frame replays a graph that draws from the runner's generator; with the request's seed it must give
    # the eager codes frame after frame (each replay advancing the generator), and frames must differ.
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    folder, _ = reference_checkpoint()
    runner = OmniModel.from_pretrained(folder, device="cuda").talker_runner
    params, cuda = SamplingParams(temperature=0.9, top_k=50, top_p=0.8, seed=3), torch.device("cuda")
    hidden = torch.randn(1, 1, runner.cfg.text.hidden_size, device=cuda)
    code0 = torch.tensor([7], device=cuda)
    with torch.inference_mode():
        for _ in range(2):   # two requests: the second reseeds and replays the graph the first captured
            sampler = Sampler(params, cuda)
            graphed = [runner.predict_residuals(hidden, code0, sampler)[0] for _ in range(3)]
            eager_sampler = Sampler(params, cuda)
            eager = [runner._predict(hidden, code0, eager_sampler)[0] for _ in range(3)]
            graph = runner.sampled_predictor_graphs[(0.9, 50, 0.8)]
            assert graph.graph is not None and not graph.failed
            assert all(torch.equal(a, b) for a, b in zip(graphed, eager))
            assert not torch.equal(graphed[0], graphed[1])


def test_cpu_runs_the_predictor_eagerly(reference_checkpoint):
    # The module path (the CPU twin forced off): eager, never captured.
    folder, _ = reference_checkpoint()
    runner = OmniModel.from_pretrained(folder).talker_runner
    greedy = Sampler(SamplingParams(temperature=0.0), torch.device("cpu"))
    hidden, code0 = torch.randn(1, 1, runner.cfg.text.hidden_size), torch.tensor([7])
    with torch.inference_mode(), ok.use_backend("torch", op="code_predictor_frame"):
        codes, embed = runner.predict_residuals(hidden, code0, greedy)
        expected = runner._predict(hidden, code0, greedy)
    assert runner.predictor_graph.graph is None
    assert torch.equal(codes, expected[0]) and torch.equal(embed, expected[1])


def test_static_decode_step_gives_the_same_answer(reference_checkpoint):
    # The graph-safe decode step (position, slot and length from tensors; attention over the whole cache, masked)
    # run eagerly on CPU: the same tokens and codes as the exact path, logits within fp32 rounding.
    from test_speech import GREEDY_TALKER
    from test_thinker_parity import IM_END, chat_prompt

    folder, _ = reference_checkpoint()
    exact, static = OmniModel.from_pretrained(folder), OmniModel.from_pretrained(folder)
    static.thinker_runner.use_decode_graph(capture=False)
    static.talker_runner.use_decode_graph(capture=False)
    kwargs = dict(max_new_tokens=8, eos_token_id=IM_END, return_audio=True, talker_max_new_tokens=10,
                  talker_sampling=GREEDY_TALKER)
    a, b = exact.generate(chat_prompt(0), **kwargs), static.generate(chat_prompt(0), **kwargs)
    assert a.text_ids == b.text_ids and torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.audio, b.audio, atol=1e-4, rtol=0)


SAMPLED_TALKER = SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.05, seed=5)


@pytest.mark.parametrize("sampled", [False, True])
def test_whole_frames_give_the_same_answer(reference_checkpoint, sampled):
    # The frame a GPU captures whole (static talker step, codebook-0 draw over the history mask, predictor frame,
    # drawing from the runner's generators) run eagerly on CPU: the same text and codes as frame by frame, for two
    # requests in a row (the second reuses the step, reseeds the generators and starts a new history). Greedy
    # with a penalty below 1 makes the codes follow the codebook-0 history (see test_speech).
    from test_thinker_parity import IM_END, chat_prompt

    folder, _ = reference_checkpoint()
    exact, static = OmniModel.from_pretrained(folder), OmniModel.from_pretrained(folder)
    static.talker_runner.use_frame_graphs(capture=False)
    history_bound = SamplingParams(temperature=0.0, repetition_penalty=0.5)
    kwargs = dict(max_new_tokens=8, eos_token_id=IM_END, return_audio=True, talker_max_new_tokens=12,
                  talker_sampling=SAMPLED_TALKER if sampled else history_bound)
    expected = exact.generate(chat_prompt(0), **kwargs)
    for _ in range(2):
        got = static.generate(chat_prompt(0), **kwargs)
        assert got.text_ids == expected.text_ids and torch.equal(got.codes, expected.codes)
        torch.testing.assert_close(got.audio, expected.audio, atol=1e-4, rtol=0)
    frames = static.talker_runner.frame_graphs
    assert len(frames) == 1 and all(step.graph is None for step in frames.values())
    assert expected.codes.shape[1] == 11


@pytest.mark.gpu
@pytest.mark.parametrize("talker_sampling", [SamplingParams(temperature=0.0, repetition_penalty=1.05),
                                             SAMPLED_TALKER])
def test_talker_frame_graph_replays_like_eager(reference_checkpoint, talker_sampling):
    # One graph per frame (talker step, codebook-0 draw, 15 predictor draws): the codes of the same frames run
    # eagerly, over two requests.
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from test_thinker_parity import IM_END, chat_prompt

    folder, _ = reference_checkpoint()
    graphed, eager = OmniModel.from_pretrained(folder, device="cuda"), OmniModel.from_pretrained(folder, device="cuda")
    eager.talker_runner.use_frame_graphs(capture=False)
    kwargs = dict(max_new_tokens=8, eos_token_id=IM_END, return_audio=True, talker_max_new_tokens=12,
                  talker_sampling=talker_sampling)
    for _ in range(2):
        a, b = graphed.generate(chat_prompt(0), **kwargs), eager.generate(chat_prompt(0), **kwargs)
        assert a.text_ids == b.text_ids and torch.equal(a.codes, b.codes)
    steps = list(graphed.talker_runner.frame_graphs.values())
    assert len(steps) == 1 and steps[0].graph is not None
