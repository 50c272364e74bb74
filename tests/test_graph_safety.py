"""What a GPU captures as CUDA graphs must never read a tensor back to the host: a read inside capture is an error
(or a silent sync, and a stale value on replay), and a data-dependent shape cannot be captured at all.

Without a GPU, each captured step runs here eagerly with the kernels a GPU runs (Triton, in the interpreter), under
a torch-function mode that fails on every host read: ``.item()``, ``int()``/``bool()``/``float()`` of a tensor,
``.tolist()``, ``.cpu()``, ``.numpy()``, ``nonzero``/``unique``/``masked_select`` and boolean-mask indexing.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import omni_kernels as ok
from omni_kernels._triton import HAS_TRITON
from omni_runtime import OmniModel
from omni_runtime.engine.code2wav_batch import Code2WavRows
from omni_runtime.engine.code2wav_runner import Code2WavRunner
from omni_runtime.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (GPU or interpreter)")

T = torch.Tensor
HOST_READS = {T.item, T.tolist, T.__int__, T.__bool__, T.__float__, T.__index__, T.cpu, T.numpy, T.nonzero,
              torch.nonzero, T.unique, torch.unique, T.masked_select, torch.masked_select}


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class NoHostReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise AssertionError(f"a captured step reads a tensor back to the host: {func.__name__}")
        if func in (T.__getitem__, T.__setitem__) and _bool_index(args[1]):
            raise AssertionError("a captured step indexes with a boolean mask (a data-dependent shape)")
        return func(*args, **(kwargs or {}))


def test_the_guard_catches_host_reads():
    x = torch.arange(4)
    for read in (lambda: int(x[0]), lambda: x.tolist(), lambda: x[x > 1], lambda: bool(x.sum()), lambda: x.item()):
        with NoHostReads(), pytest.raises(AssertionError, match="captured step"):
            read()
    with NoHostReads():   # what steps do: arithmetic, gathers, scatters, in-place updates
        x.scatter_(0, torch.tensor([1]), 7)
        assert torch.where(x > 1, x, 0).shape == (4,)


@pytest.fixture(scope="module")
def model(reference_checkpoint):
    return OmniModel.from_pretrained(reference_checkpoint()[0])


@pytest.mark.parametrize("sampled", [False, True])
def test_talker_frame_step_reads_nothing_back(model, sampled):
    # The whole frame a GPU captures: talker step, codebook-0 draw over the history mask, the predictor's 15 steps.
    runner = model.talker_runner
    hidden_size = runner.cfg.text.hidden_size
    talker_params = (SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.05, seed=1) if sampled else
                     SamplingParams(temperature=0.0, repetition_penalty=1.05))
    talker = Sampler(talker_params, torch.device("cpu"), runner.code0_suppress)
    predictor = Sampler(SamplingParams(temperature=1.0, top_k=50, top_p=0.8, seed=2) if sampled else
                        SamplingParams(temperature=0.0), torch.device("cpu"))
    runner.use_frame_graphs(capture=False)
    try:
        with torch.inference_mode(), ok.use_backend("triton"):
            positions = torch.arange(8).view(1, 1, -1).expand(3, 1, -1)
            prompt = 0.02 * torch.randn(1, 8, hidden_size, generator=torch.Generator().manual_seed(0))
            logits, hidden = runner.prefill(prompt, positions)
            runner.begin_answer(talker, predictor)
            drawn = [runner.sample_code0(logits, talker)]
            _, frame_embed = runner.predict_residuals(hidden, drawn[0], predictor)
            step = runner._frame_graph(talker, predictor)
            for _ in range(2):
                with NoHostReads():
                    code0, residuals, frame_embed = step(frame_embed, torch.zeros_like(frame_embed))
                drawn.append(code0)
        assert residuals.shape == (runner.cfg.num_code_groups - 1,)
        history = torch.zeros_like(runner.code0_seen).scatter_(1, torch.cat(drawn).view(1, -1), True)
        assert torch.equal(runner.code0_seen, history)   # the step kept the history on the device
    finally:
        runner.frame_capture = None
        runner.frame_graphs.clear()


def test_thinker_decode_step_reads_nothing_back(model):
    runner = model.thinker_runner
    runner.use_decode_graph(capture=False)
    try:
        with torch.inference_mode(), ok.use_backend("triton"):
            embeds = 0.02 * torch.randn(1, 5, model.config.thinker_text.hidden_size)
            positions = torch.arange(5).view(1, 1, -1).expand(3, 1, -1)
            runner.thinker(embeds, runner.state.start(positions), runner.state.cache)
            with NoHostReads():
                logits = runner.decode(torch.tensor([[7]]))
        assert logits.shape == (1, model.config.thinker_text.vocab_size)
    finally:
        runner.decode_graph = None


def test_code2wav_push_reads_nothing_back(model):
    runner = Code2WavRunner(model.code2wav, capture=False)
    codes = torch.randint(0, 64, (1, 16, 2), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), ok.use_backend("triton"):
        runner.start().push(codes)   # the first push makes the carried buffers (not captured)
        with NoHostReads():          # what Code2WavChunkGraph captures (the checks before it run on the host)
            wav = runner.stream.decode_checked(codes)
    assert wav.shape[0] == 1 and wav.numel() > 0


def test_batched_code2wav_push_reads_nothing_back(model):
    rows = Code2WavRows(model.code2wav, max_batch=4, capture=False)
    for _ in range(3):
        rows.acquire()
    codes = torch.randint(0, 64, (4, 16, 2), generator=torch.Generator().manual_seed(0))
    index = torch.tensor([0, 1, 2, 4])   # three rows and the spare one, as a bucket of 4
    with torch.inference_mode(), ok.use_backend("triton"):
        rows.push([0, 1, 2], codes[:3])   # the first push makes the row buffers (not captured)
        with NoHostReads():               # what a graph of Code2WavRows captures: gather, decode, scatter
            wav = rows._push(index, codes, first=False)
    assert wav.shape == (4, 1, 2 * 1920)


def test_batched_thinker_step_reads_nothing_back(model):
    from omni_runtime.engine.thinker_batch import BatchedThinkerRunner
    runner = BatchedThinkerRunner(model.thinker, model.config.thinker_text, 4, 32, model.device, model.dtype)
    runner.step_weights = None   # as on a GPU: the module step, not the CPU's C++ twin
    step = runner._step(4)
    rows = torch.arange(4)
    with torch.inference_mode(), ok.use_backend("triton"), NoHostReads():
        logits = step(torch.tensor([[3], [5], [7], [9]]), (rows[None, :, None] + 4.0).expand(3, 4, 1),
                      rows.view(4, 1) + 4, (rows + 5).int())
    assert logits.shape == (4, model.config.thinker_text.vocab_size)


@pytest.mark.parametrize("sampled", [False, True])
def test_batched_talker_frame_reads_nothing_back(model, sampled):
    # What a GPU captures per bucket of the batched talker: every row's talker step, its own codebook-0 draw over its
    # own history row, and the predictor's 15 steps for all rows (the module path: no C++ frame weights given).
    from omni_runtime.engine.talker_batch import BatchedTalkerRunner
    cfg, cpu = model.config.talker, torch.device("cpu")
    runner = BatchedTalkerRunner(model.talker, cfg, 4, 32, cpu, model.dtype, model.talker_runner.code0_suppress)
    runner.step_weights = None   # as on a GPU: the module step, not the CPU's C++ twin
    talker = SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.05) if sampled else \
        SamplingParams(temperature=0.0, repetition_penalty=1.05)
    predictor = SamplingParams(temperature=1.0, top_k=50, top_p=0.8) if sampled else SamplingParams(temperature=0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode(), ok.use_backend("triton"):
        for row in range(4):
            assert runner.acquire() == row
            prompt = 0.02 * torch.randn(1, 6 + row, cfg.text.hidden_size, generator=generator)
            logits, _ = runner.prefill(row, prompt, torch.arange(6 + row).view(1, 1, -1).expand(3, 1, -1))
            runner.begin_answer(row, Sampler(talker, cpu, runner.code0_suppress),
                                Sampler(predictor, cpu))
            runner.sample_code0(row, logits)
        seen = runner.code0_seen.clone()
        with NoHostReads():
            code0, residuals, embeds = runner._step(4)(
                0.02 * torch.randn(4, 1, cfg.text.hidden_size, generator=generator), runner.next_positions,
                runner.lengths.view(4, 1), (runner.lengths + 1).int())
        expected = seen.scatter_(1, code0.view(4, 1), True)
    assert residuals.shape == (4, cfg.num_code_groups - 1) and embeds.shape == (4, 1, cfg.text.hidden_size)
    assert torch.equal(runner.code0_seen, expected)   # each row's history took its own code
