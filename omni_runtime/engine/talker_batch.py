"""The talker's batched runner: up to ``max_batch`` spoken answers advance one frame per step together, each in its
own row of one static talker cache, at its own length and rotary position (rows, buckets and padding:
engine/batch_rows.py).

A frame step is the single runner's ``frame`` over a bucket of rows: one talker step for every row, each row's
codebook-0 draw (its repetition penalty reads its own row of the ``[max_batch, V]`` history mask), then the code
predictor's 15 steps for all rows at once. The predictor's cache is rewritten each frame, so every row sits at the
same predictor position and the 15 step contexts are shared. Each row draws from its own generators, reseeded from
its answer's seeds (``begin_answer``): a seed gives every answer the codes it gets alone. On a GPU a bucket's frame
(per sampling settings of its rows) replays one CUDA graph with those generators registered; on a CPU (fp32) the
talker step over the rows and each row's predictor frame are calls of their C++ twins. The answers that start
together prefill as one right-padded forward (``prefill_many``), and their first frames (the predictor only, right
after the prefill) run eagerly over their rows.
"""
from __future__ import annotations

import torch

import omni_kernels as ok
from omni_runtime.config import TalkerConfig
from omni_runtime.engine.batch_rows import BatchedRows, CacheRows
from omni_runtime.engine.decoder_state import DecoderState
from omni_runtime.engine.graphs import BatchStepGraph
from omni_runtime.engine.talker_runner import predict_in_one_call
from omni_runtime.layers import StepContext
from omni_runtime.models.talker import Talker
from omni_runtime.sampling import Sampler, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def draw_rows(draws: list[Sampler], logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits: [n, V] fp32, one sampler per row (``seen``: their [n, V] histories) -> tokens [n], each row's the one
    it would draw alone. Rows that share one setting are warped together (one argmax when greedy) and draw row by
    row, each from its own generator; mixed settings go row by row."""
    first = draws[0]
    if all(d.params.warpers == first.params.warpers and d.suppress is first.suppress for d in draws):
        return first.draw_rows(logits, [d.generator for d in draws], seen)
    return torch.cat([d(logits[i:i + 1], seen=None if seen is None else seen[i:i + 1]) for i, d in enumerate(draws)])


class BatchedTalkerRunner(BatchedRows):
    name = "batched talker"

    def __init__(self, talker: Talker, cfg: TalkerConfig, max_batch: int, max_len: int, device: torch.device,
                 dtype: torch.dtype, code0_suppress: torch.Tensor, frame_weights: ok.PredictorWeights | None = None,
                 capture: bool = True):
        """``code0_suppress``, ``frame_weights``: the single runner's (its codec-special mask, the one frame steps
        are kept for; its predictor weights for the one-call frame, on a CPU in fp32)."""
        super().__init__(cfg.text, max_batch, max_len, device, dtype, capture)
        self.talker, self.cfg, self.code0_suppress = talker, cfg, code0_suppress
        self.frame_weights = frame_weights
        self.step_weights = self.state.one_call_weights(talker.model.layers, talker.model.norm.weight,
                                                        talker.codec_head.weight)
        self.predictor = DecoderState(cfg.code_predictor, cfg.num_code_groups, device, dtype, multimodal_rope=False,
                                      batch=max_batch)
        self.predictor_contexts: dict[int, list[StepContext]] = {}   # per row count: the 15 step contexts
        self.code0_seen = torch.zeros(max_batch, cfg.text.vocab_size, dtype=torch.bool, device=device)
        self.talker_generators = [torch.Generator(device) for _ in range(max_batch)]
        self.predictor_generators = [torch.Generator(device) for _ in range(max_batch)]
        greedy = Sampler(GREEDY, device)
        self.code0_draws = [greedy] * max_batch       # each live row's answer's samplers, on the row's generators
        self.predictor_draws = [greedy] * max_batch
        self.steps: dict[tuple, BatchStepGraph] = {}  # per (bucket, its rows' sampling settings)

    def begin_answer(self, row: int, talker_sampler: Sampler, predictor_sampler: Sampler) -> None:
        """The answer in ``row`` starts: an empty codebook-0 history; the row's generators restart from the
        samplers' seeds."""
        self.code0_seen[row] = False
        for sampler, generator in ((talker_sampler, self.talker_generators[row]),
                                   (predictor_sampler, self.predictor_generators[row])):
            if sampler.generator is not None:
                generator.manual_seed(sampler.generator.initial_seed())
        self.code0_draws[row] = self._draw_like(talker_sampler, self.talker_generators[row])
        self.predictor_draws[row] = self._draw_like(predictor_sampler, self.predictor_generators[row])

    @torch.inference_mode()
    def prefill(self, row: int, embeds: torch.Tensor, positions: torch.Tensor,
                start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds: [1, L, H], positions: [3, 1, L] of the answer in ``row``, after the ``start`` prompt rows the row
        holds already (``extend``) -> (codec logits fp32 [1, V], last post-norm hidden [1, 1, H]), as
        ``TalkerRunner.prefill``."""
        hidden = self.extend(row, embeds, positions, start)
        return self.talker.codec_head(hidden)[:, -1].float(), hidden[:, -1:]

    @torch.inference_mode()
    def extend(self, row: int, embeds: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor:
        """Prompt rows ``start:start + L`` (embeds [1, L, H] at positions [3, 1, L]) into ``row``'s cache, which holds
        the first ``start`` -> their post-norm hidden states [1, L, H]. Attention reads the cached rows, so a prompt
        given in parts leaves the cache a whole prefill does, up to the rounding of GEMMs over fewer rows."""
        ctx, cache = self.prefill_context(row, positions, start)
        return self.talker.model(embeds, ctx, cache)

    @torch.inference_mode()
    def prefill_many(self, rows: list[int], embeds: list[torch.Tensor], positions: list[torch.Tensor],
                     starts: list[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The answers in ``rows`` that start together: ``prefill``'s inputs and outputs for each, in their order,
        right-padded into one forward per group of ``prefill_tokens`` padded tokens (``prefill_padded``); an answer
        whose row holds the first ``starts[i]`` prompt rows already prefills the rest alone."""
        starts = starts or [0] * len(rows)
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for group in self.prefill_groups([e.shape[1] for e in embeds], {i for i, s in enumerate(starts) if s}):
            if len(group) == 1:
                i = group[0]
                out[i] = self.prefill(rows[i], embeds[i], positions[i], starts[i])
                continue
            hidden, lengths = self.prefill_padded([rows[j] for j in group], [embeds[j] for j in group],
                                                  [positions[j] for j in group], self.talker.model)   # [n, L, H]
            last = torch.tensor(lengths, device=hidden.device) - 1
            hidden = hidden[torch.arange(len(group), device=hidden.device), last][:, None]          # [n, 1, H]
            logits = self.talker.codec_head(hidden)[:, -1].float()                                  # [n, V]
            out.update((j, (logits[i:i + 1], hidden[i:i + 1])) for i, j in enumerate(group))
        return [out[i] for i in range(len(rows))]

    def sample_code0(self, row: int, logits: torch.Tensor) -> torch.Tensor:
        """logits: [1, V] fp32 -> the row's codebook-0 code [1], penalised by and added to its history."""
        code0 = self.code0_draws[row](logits, seen=self.code0_seen[row:row + 1])
        self.code0_seen[row, code0] = True
        return code0

    @torch.inference_mode()
    def predict(self, rows: list[int], hidden: torch.Tensor,
                code0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first frame of the answers in ``rows``: hidden [n, 1, H] (their prefills' last states), code0 [n]
        -> (codes of codebooks 1..Q-1 [n, Q-1], frame embeddings [n, 1, H])."""
        return self._predict(hidden, code0, [self.predictor_draws[r] for r in rows])

    @torch.inference_mode()
    def frame(self, rows: list[int], embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One frame of the answers in ``rows``: embeds [n, 1, H] (previous frame's embedding plus the text row)
        -> (code0 [n], codes of codebooks 1..Q-1 [n, Q-1], this frame's embeddings [n, 1, H])."""
        return self.step_rows(rows, embeds)

    def _bucket_draws(self, batch: int) -> tuple[list[Sampler], list[Sampler]]:
        """The samplers of rows 0..batch-1; a free row draws like the first live row, from its own generators (its
        codes are thrown away; one setting across the bucket keeps its draws batched and its graphs few)."""
        lead = next((r for r in range(batch) if self.live[r]), 0)
        code0, predictor = [], []
        for row in range(batch):
            live = self.live[row]
            code0.append(self.code0_draws[row] if live else
                         self._draw_like(self.code0_draws[lead], self.talker_generators[row]))
            predictor.append(self.predictor_draws[row] if live else
                             self._draw_like(self.predictor_draws[lead], self.predictor_generators[row]))
        return code0, predictor

    def _draw_like(self, sampler: Sampler, generator: torch.Generator) -> Sampler:
        """``sampler``'s setting, drawing from ``generator`` as it stands."""
        if sampler.params.greedy:
            return sampler
        return Sampler(sampler.params, self.state.device, sampler.suppress, generator=generator)

    def _step(self, batch: int) -> BatchStepGraph:
        code0_draws, predictor_draws = self._bucket_draws(batch)
        # A step captures its draws' suppress masks, so it is kept (and replayed) only for the runner's mask or none,
        # as ``TalkerRunner._frame_graph``; a row with a mask of its own runs an eager step made for this frame.
        if any(d.suppress is not None and d.suppress is not self.code0_suppress for d in code0_draws):
            return self._frame_step(batch, code0_draws, predictor_draws, capture=False)
        key = (batch, *((d.params.warpers, d.suppress is None) for d in code0_draws),
               *(d.params.warpers for d in predictor_draws))
        if key not in self.steps:
            self.steps[key] = self._frame_step(batch, code0_draws, predictor_draws, self.capture)
        return self.steps[key]

    def _frame_step(self, batch: int, code0_draws: list[Sampler], predictor_draws: list[Sampler],
                    capture: bool) -> BatchStepGraph:
        """The static frame of rows 0..batch-1, drawing with these samplers."""
        kv = self.state.cache.kv

        def frame(embeds: torch.Tensor, ctx: StepContext):
            if self.state.steps_in_one_call(self.step_weights):   # CPU: the C++ twin over the rows
                hidden, logits = self.state.rows_in_one_call(embeds.view(batch, -1), self.step_weights, ctx)
                hidden = hidden.view(batch, 1, -1)
            else:
                hidden = self.talker.model(embeds, ctx, CacheRows(kv, slice(0, batch)))    # [b, 1, H]
                logits = self.talker.codec_head(hidden)[:, -1].float()                     # [b, V]
            seen = self.code0_seen[:batch]
            code0 = draw_rows(code0_draws, logits, seen)                                   # [b]
            seen.scatter_(1, code0.view(-1, 1), True)
            return (code0, *self._predict(hidden, code0, predictor_draws))

        generators = tuple(d.generator for d in (*code0_draws, *predictor_draws) if d.generator is not None)
        like = torch.zeros(batch, 1, self.cfg.text.hidden_size, dtype=self.state.dtype, device=self.state.device)
        return BatchStepGraph(frame, self.state, like, batch, capture, generators=generators,
                              buffers=(self.code0_seen,))

    def _predict(self, hidden: torch.Tensor, code0: torch.Tensor,
                 draws: list[Sampler]) -> tuple[torch.Tensor, torch.Tensor]:
        """The predictor over rows 0..n-1 of its cache, as ``TalkerRunner._predict`` with one sampler per row. On a
        CPU (fp32) each row is one call of the C++ twin instead, as the single runner's frames: the same bits."""
        if (self.frame_weights is not None and all(d.suppress is None for d in draws)
                and ok.selected_backend("code_predictor_frame", self.state.device) == "cpp"):
            frames = [predict_in_one_call(self.talker, self.frame_weights, hidden[i:i + 1], code0[i:i + 1], d.params,
                                          d.generator) for i, d in enumerate(draws)]
            return torch.stack([codes for codes, _ in frames]), torch.cat([embed for _, embed in frames])
        predictor, n = self.talker.code_predictor, hidden.shape[0]
        cache = CacheRows(self.predictor.cache.kv, slice(0, n))
        embeds = [self.talker.model.codec_embedding(code0.view(n, 1))]                   # Q x [n, 1, H]
        x = torch.cat([hidden, embeds[0]], dim=1)                                         # [n, 2, H]
        codes = []
        for group, ctx in enumerate(self._predictor_contexts(n)):
            out = predictor.model(x, ctx, cache)
            codes.append(draw_rows(draws, predictor.lm_head[group](out)[:, -1].float()))  # [n]
            x = predictor.model.codec_embedding[group](codes[-1].view(n, 1))
            embeds.append(x)
        return torch.stack(codes, dim=1), torch.cat(embeds, dim=1).sum(1, keepdim=True)

    def _predictor_contexts(self, rows: int) -> list[StepContext]:
        """The prefill of (talker state, codebook-0 embedding) at positions 0-1, then one position per codebook,
        with rotary rows for ``rows`` sequences."""
        if rows not in self.predictor_contexts:
            state = self.predictor
            contexts = [state.start(torch.arange(2, device=state.device).view(1, -1))]
            contexts += [state.next_context() for _ in range(self.cfg.num_code_groups - 2)]
            self.predictor_contexts[rows] = [
                StepContext(c.cos.expand(rows, -1, -1).contiguous(), c.sin.expand(rows, -1, -1).contiguous(),
                            c.cache_positions, c.kv_len) for c in contexts]
        return self.predictor_contexts[rows]
