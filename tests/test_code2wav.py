"""Code2Wav equal to transformers' on the same random checkpoint (forward and chunked_decode), and the exact stream
equal to the offline decode for any chunking."""
import copy
import json

import pytest
import torch

from omni_runtime.engine.code2wav_batch import Code2WavRows
from omni_runtime.engine.code2wav_runner import Code2WavRunner
from omni_runtime.models.code2wav import Code2Wav, Code2WavConfig, Code2WavStream, load_code2wav

FRAMES = [1, 5, 23, 40, 80]          # 80 > the 72-frame window: the reference switches to a sliding-window mask


def random_codes(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2048, (batch, 16, frames), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def checkpoint(reference_checkpoint):
    folder, hf_model = reference_checkpoint()
    return folder, hf_model.code2wav


@pytest.fixture(scope="module")
def models(checkpoint):
    """Ours and the reference's Code2Wav per dtype, loaded from the same saved folder."""
    folder, reference = checkpoint
    reference_bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    # .to() rounds the rotary inv_freq buffer too; from_pretrained(dtype=bf16) keeps it fp32 (spec pitfall 9).
    reference_bf16.pre_transformer.rotary_emb.inv_freq = reference.pre_transformer.rotary_emb.inv_freq.clone()
    return {torch.float32: (load_code2wav(folder), reference),
            torch.bfloat16: (load_code2wav(folder, torch.bfloat16), reference_bf16)}


def test_config_reads_the_checkpoint_and_defaults_to_the_release(checkpoint):
    folder, reference = checkpoint
    cfg = Code2WavConfig.from_dict(json.loads((folder / "config.json").read_text())["code2wav_config"])
    hf = reference.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.decoder_dim, cfg.sliding_window) == (
            hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
            hf.intermediate_size, hf.decoder_dim, hf.sliding_window)
    assert cfg.head_dim == 8 and cfg.rope_theta == hf.rope_parameters["rope_theta"] == 1e4
    release = Code2WavConfig.from_dict({})
    assert (release.hidden_size, release.num_hidden_layers, release.num_attention_heads, release.head_dim,
            release.intermediate_size, release.sliding_window, release.codebook_size, release.num_quantizers,
            release.decoder_dim, release.upsample_rates, release.upsampling_ratios, release.rope_theta,
            release.rms_norm_eps, release.max_position_embeddings) == (
            1024, 8, 16, 64, 3072, 72, 2048, 16, 1536, (8, 5, 4, 3), (2, 2), 1e4, 1e-5, 8000)
    assert (release.samples_per_frame, release.lost_samples) == (1920, 555)
    with pytest.raises(ValueError, match="hidden_act"):
        Code2WavConfig.from_dict({"hidden_act": "gelu"})


def test_parameters_are_the_checkpoint_tensors(checkpoint):
    folder, reference = checkpoint
    with torch.device("meta"):
        model = Code2Wav(Code2WavConfig.from_dict(json.loads((folder / "config.json").read_text())["code2wav_config"]))
    ours = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert ours == {name: tuple(p.shape) for name, p in reference.named_parameters()}
    assert not list(model.buffers())


@pytest.mark.parametrize("frames", FRAMES)
def test_forward_matches_reference_fp32(models, frames):
    model, reference = models[torch.float32]
    codes = random_codes(2, frames, seed=frames)
    with torch.inference_mode():
        expected = reference(codes).float()
        wav = model(codes)
    assert wav.shape == (2, 1, 1920 * frames - 555) and wav.dtype == torch.float32
    assert 0.05 < wav.std() < 0.5                       # the test init makes a real signal, not 1e-7 or all clipped
    torch.testing.assert_close(wav, expected, atol=0, rtol=0)   # same ops in the same order: bit-identical


@pytest.mark.parametrize("frames", [1, 23])
def test_forward_matches_reference_bf16(models, frames):
    model, reference = models[torch.bfloat16]
    codes = random_codes(1, frames, seed=100 + frames)
    with torch.inference_mode():
        expected = reference(codes).float()
        wav = model(codes)
    assert wav.dtype == torch.float32
    torch.testing.assert_close(wav, expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("frames, chunk, left_context", [(23, 10, 3), (40, 10, 3), (23, 5, 12), (5, 300, 25)])
def test_chunked_decode_matches_reference(models, dtype, frames, chunk, left_context):
    model, reference = models[dtype]
    codes = random_codes(1, frames, seed=200 + frames)
    with torch.inference_mode():
        expected = reference.chunked_decode(codes, chunk, left_context).float()
        wav = model.chunked_decode(codes, chunk, left_context)
    chunks = -(-frames // chunk)
    assert wav.shape == (1, 1, 1920 * frames - 555 * chunks)
    torch.testing.assert_close(wav, expected, atol=0, rtol=0)


def stream_decode(model, codes, chunks):
    stream, pieces, start = Code2WavStream(model), [], 0
    for size in chunks:
        piece = stream.push(codes[..., start:start + size])
        # every sample that no later frame can change, and nothing else
        assert piece.shape[-1] == 1920 * size - (555 if start == 0 else 0)
        pieces.append(piece)
        start += size
    assert start == codes.shape[-1]
    tail = stream.flush()
    assert tail.shape == (codes.shape[0], 1, 0)
    return torch.cat([*pieces, tail], dim=-1), stream


# (fp32 stream - offline) measured <= 4.2e-6: the transformer rounds differently on 1-frame GEMMs and shifted key
# windows (~1e-7), and the random decoder amplifies that ~30x. The convs stream bit-identically (test_rvq_conv_ops).
@pytest.mark.parametrize("chunks", [(1, 1, 4, 25, 59), (1,) * 40 + (50,), (7,) * 12 + (6,), (3, 80, 7), (90,)],
                         ids=["1-1-4-25-59", "ones", "sevens", "3-80-7", "whole"])
def test_stream_equals_forward(models, chunks):
    model, _ = models[torch.float32]
    codes = random_codes(2, 90, seed=300)
    with torch.inference_mode():
        offline = model(codes)
    streamed, _ = stream_decode(model, codes, chunks)
    torch.testing.assert_close(streamed, offline, atol=1e-5, rtol=0)


def test_stream_state_does_not_grow(models):
    model, _ = models[torch.float32]
    codes = random_codes(1, 100, seed=400)

    def carried_shapes(frames):
        stream = Code2WavStream(model)
        stream.push(codes[..., :frames - 5])
        stream.push(codes[..., frames - 5:frames])
        return [tuple(t.shape) for value in stream.state.carried.values()
                for t in (value if isinstance(value, tuple) else (value,))]

    shapes = carried_shapes(100)
    assert shapes == carried_shapes(80)
    window = model.cfg.sliding_window
    assert max(shape[2] for shape in shapes if len(shape) == 4) == window - 1     # keys/values: the last 71 frames


def test_stream_bf16_stays_near_fp32(models):
    (model, _), (model32, _) = models[torch.bfloat16], models[torch.float32]
    codes = random_codes(1, 30, seed=500)
    with torch.inference_mode():
        fp32, offline = model32(codes), model(codes)
    streamed, _ = stream_decode(model, codes, (1, 4, 25))
    offline_error = (offline - fp32).abs().max()
    assert (streamed - fp32).abs().max() <= 2 * offline_error + 1e-2


def test_flush_resets_the_stream(models):
    model, _ = models[torch.float32]
    codes = random_codes(1, 6, seed=600)
    first, _ = stream_decode(model, codes, (2, 4))
    stream = Code2WavStream(model)
    stream.push(random_codes(1, 3, seed=601))
    assert stream.flush().shape == (1, 1, 0) and stream.frames == 0
    again = torch.cat([stream.push(codes[..., :2]), stream.push(codes[..., 2:])], dim=-1)
    assert torch.equal(again, first)


def test_bad_codes_are_rejected(models):
    model, _ = models[torch.float32]
    codes = random_codes(1, 3)
    bad = {
        "must be in \\[0, 2048\\)": [codes.clone().index_fill_(2, torch.tensor([1]), 2048),
                                     codes.clone().index_fill_(2, torch.tensor([0]), -1)],
        "expected 16 quantizers": [codes[:, :15]],
        "must be a \\[batch, 16, frames\\]": [codes[0], codes[None], [[0] * 16]],
        "integers": [codes.float()],
        "empty": [codes[..., :0]],
    }
    for message, inputs in bad.items():
        for value in inputs:
            for decode in (model, model.chunked_decode, Code2WavStream(model).push):
                with pytest.raises(ValueError, match=message):
                    decode(value)
    with pytest.raises(ValueError, match="chunk_size"):
        model.chunked_decode(codes, chunk_size=0)
    stream = Code2WavStream(model)
    stream.push(codes)
    with pytest.raises(ValueError, match="batch of 1"):
        stream.push(random_codes(2, 1))


# --- the static stream (what a CUDA graph replays) ----------------------------------------------------------------

def runner_decode(runner, codes: torch.Tensor, chunks) -> torch.Tensor:
    stream, pieces, start = runner.start(), [], 0
    for n in chunks:
        pieces.append(stream.push(codes[..., start:start + n]))
        start += n
    return torch.cat([*pieces, stream.flush()], dim=-1)


@pytest.mark.parametrize("chunks", [(1, 4, 4, 25, 56), (1,) * 10 + (80,), (3,) * 30], ids=["1-4-4-25-56", "ones-80",
                                                                                        "threes"])
def test_static_stream_equals_exact_stream(models, chunks):
    # Past the 72-frame window too: the fixed window - 1 frame key buffer, masked while it fills, gives the exact
    # stream's samples up to float rounding.
    model, _ = models[torch.float32]
    codes = random_codes(1, 90, seed=700)
    exact, _ = stream_decode(model, codes, chunks)
    static = runner_decode(Code2WavRunner(model, capture=False), codes, chunks)
    torch.testing.assert_close(static, exact, atol=1e-5, rtol=0)


def test_runner_reuses_its_buffers_across_streams(models):
    # Captured graphs hold addresses: later answers must run in the first one's buffers, each from a clean start.
    model, _ = models[torch.float32]
    runner = Code2WavRunner(model, capture=False)
    runner_decode(runner, random_codes(1, 13, seed=701), (1, 4, 4, 4))
    addresses = [t.data_ptr() for t in runner.stream.state.tensors()]
    keys = []
    for seed in (702, 703):   # the second answer adds its first push's graph; the third adds none
        codes = random_codes(1, 9, seed=seed)
        again = runner_decode(runner, codes, (1, 4, 4))
        assert [t.data_ptr() for t in runner.stream.state.tensors()] == addresses
        torch.testing.assert_close(again, stream_decode(model, codes, (1, 4, 4))[0], atol=1e-5, rtol=0)
        keys.append(set(runner.graphs))
    assert keys[0] == keys[1] == {(1, 16, 4, False), (1, 16, 1, True)}
    stream = runner.start()
    stream.push(random_codes(1, 1))
    with pytest.raises(ValueError, match="static buffers hold batches of 1"):
        stream.push(random_codes(2, 1))
    runner.start()   # a new stream in the same buffers: their batch size too, refused by name, nothing changed
    with pytest.raises(ValueError, match="static buffers hold batches of 1"):
        runner.push(random_codes(2, 1))
    codes = random_codes(1, 9, seed=704)
    torch.testing.assert_close(runner_decode(runner, codes, (1, 4, 4)), stream_decode(model, codes, (1, 4, 4))[0],
                               atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_code2wav_chunk_graph_replays_like_eager(reference_checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    folder, _ = reference_checkpoint()
    model = load_code2wav(folder, device="cuda")
    codes = random_codes(1, 40, seed=703).cuda()
    chunks = (1,) + (4,) * 9 + (3,)
    graphed_runner = Code2WavRunner(model)
    graphed = [runner_decode(graphed_runner, codes, chunks) for _ in range(2)]   # the second answer replays
    assert graphed_runner.graphs and all(g.graph is not None for g in graphed_runner.graphs.values())
    eager = runner_decode(Code2WavRunner(model, capture=False), codes, chunks)
    for wav in graphed:
        torch.testing.assert_close(wav, eager, atol=1e-5, rtol=0)


# --- rows of streams decoded together (concurrent answers) --------------------------------------------------------

def rows_decode(rows: Code2WavRows, codes: list[torch.Tensor], schedule) -> list[torch.Tensor]:
    """Pushes ``schedule``'s (row indices, frames) in order, each a batched push of the next frames of those rows'
    codes ([1, 16, T] each) -> every row's samples so far."""
    pieces, starts = [[] for _ in codes], [0] * len(codes)
    for members, n in schedule:
        chunk = torch.cat([codes[i][..., starts[i]:starts[i] + n] for i in members])
        first = [starts[i] == 0 for i in members]
        wav = rows.push(list(members), chunk)
        assert wav.shape == (len(members), 1, 1920 * n - (555 if first[0] else 0))
        for j, i in enumerate(members):
            pieces[i].append(wav[j:j + 1])
            starts[i] += n
    return [torch.cat(p, dim=-1) for p in pieces]


# Four streams at their own positions: rows that start later, pushes of mixed sizes, buckets with a spare row (3 of
# 4), and rows past the 72-frame window next to rows still filling it.
ROW_SCHEDULE = [((0,), 1), ((0,), 40), ((1, 2), 1), ((0, 1, 2), 4), ((3,), 3), ((0, 1, 2, 3), 30), ((2, 3), 2),
                ((0, 3), 1), ((0, 1, 2), 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_equal_their_own_streams(models, dtype):
    model, _ = models[dtype]
    codes = [random_codes(1, 90, seed=800 + i) for i in range(4)]
    rows = Code2WavRows(model, max_batch=4, capture=False)
    assert [rows.acquire() for _ in range(4)] == [0, 1, 2, 3]
    got = rows_decode(rows, codes, ROW_SCHEDULE)
    for i, wav in enumerate(got):
        chunks = [n for members, n in ROW_SCHEDULE if i in members]
        exact, _ = stream_decode(model, codes[i][..., :sum(chunks)], chunks)
        if dtype == torch.float32:
            torch.testing.assert_close(wav, exact, atol=1e-5, rtol=0)
        else:   # bf16 rows round like the bf16 stream, each apart from fp32 by what the offline bf16 decode is
            fp32 = models[torch.float32][0](codes[i][..., :sum(chunks)])
            assert (wav - fp32).abs().max() <= 2 * (exact - fp32).abs().max() + 1e-2
    assert rows.frames == [81, 40, 42, 36]
    assert rows.positions[:4].tolist() == rows.frames


def test_released_rows_start_new_streams_and_idle_rows_keep_theirs(models):
    model, _ = models[torch.float32]
    rows = Code2WavRows(model, max_batch=4, capture=False)
    codes = [random_codes(1, 30, seed=810 + i) for i in range(4)]
    for _ in range(4):
        rows.acquire()
    rows.push([0, 1, 2, 3], torch.cat([c[..., :2] for c in codes]))
    rows.release(0)                     # row 0's answer ended; row 3 waits for its next frames
    assert rows.acquire() == 0 and rows.frames[0] == 0
    fresh = random_codes(1, 30, seed=820)
    got = [rows.push([0], fresh[..., :3])]
    rows.push([1, 2], torch.cat([c[..., 2:6] for c in codes[1:3]]))   # a bucket of 2
    got.append(rows.push([0, 1, 2], torch.cat([fresh[..., 3:8], *(c[..., 6:11] for c in codes[1:3])]))[:1])
    exact, _ = stream_decode(model, fresh[..., :8], (3, 5))
    torch.testing.assert_close(torch.cat(got, dim=-1), exact, atol=1e-5, rtol=0)
    late = rows.push([3], codes[3][..., 2:6])   # after a push of 3 rows padded into the spare row
    full, _ = stream_decode(model, codes[3][..., :6], (2, 4))
    torch.testing.assert_close(late, full[..., 1920 * 2 - 555:], atol=1e-5, rtol=0)


def test_rows_reject_bad_pushes(models):
    model, _ = models[torch.float32]
    rows = Code2WavRows(model, max_batch=2, capture=False)
    row = rows.acquire()
    with pytest.raises(ValueError, match=r"rows \[1\] hold no stream"):
        rows.push([row, 1], random_codes(2, 1))
    with pytest.raises(ValueError, match="distinct rows"):
        rows.push([row, row], random_codes(2, 1))
    with pytest.raises(ValueError, match="one row of codes each"):
        rows.push([row], random_codes(2, 1))
    with pytest.raises(ValueError, match="must be in"):
        rows.push([row], random_codes(1, 1) + 2048)
    rows.push([row], random_codes(1, 2))
    other = rows.acquire()
    with pytest.raises(ValueError, match="mix first pushes with later ones"):
        rows.push([row, other], random_codes(2, 1))
    with pytest.raises(ValueError, match="all 2 rows of the batched Code2Wav are in use"):
        rows.acquire()


@pytest.mark.gpu
def test_rows_graphs_replay_like_eager(reference_checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    model = load_code2wav(reference_checkpoint()[0], device="cuda")
    codes = [random_codes(1, 90, seed=830 + i).cuda() for i in range(4)]
    graphed = Code2WavRows(model, max_batch=4)
    eager = Code2WavRows(model, max_batch=4, capture=False)
    for rows in (graphed, eager):
        for _ in range(4):
            rows.acquire()
    schedule = ROW_SCHEDULE + [((0, 1, 2), 4), ((0, 1, 2), 4)]   # pushes of captured shapes replay
    got, expected = rows_decode(graphed, codes, schedule), rows_decode(eager, codes, schedule)
    assert graphed.graphs and all(g.graph is not None for g in graphed.graphs.values())
    for wav, want in zip(got, expected):
        torch.testing.assert_close(wav, want, atol=1e-5, rtol=0)
