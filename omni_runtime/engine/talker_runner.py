"""The talker's runner: owns the talker's KV cache, the code predictor's 16-slot cache and an answer's codebook-0
history.

One talker step turns the previous frame into the next codebook-0 code; the code predictor then fills codebooks
1..15 of that frame with 15 dependent steps over a cache it rewrites each frame (2-token prefill + 14 decodes), so
its state never grows. Its 15 step contexts (rotary rows, slots, lengths) are the same every frame: built once.

``frame`` is one whole frame after the first: talker step, codebook-0 draw (repetition penalty over a device-side
mask of the codes drawn so far), predictor frame. On a GPU it replays one CUDA graph per sampling setting, with no
host synchronisation inside; its draws come from the runner's generators, which each answer reseeds with its
samplers' seeds (``begin_answer``), so a seed gives the codes of eager draws from the samplers' own generators.
On a CPU (fp32) the talker step and the predictor frame are one call each of their C++ twins
(``ok.decoder_step``, ``ok.code_predictor_frame``).
"""
from __future__ import annotations

import torch

import omni_kernels as ok
from omni_runtime.config import TalkerConfig
from omni_runtime.engine.decoder_state import DecoderState
from omni_runtime.engine.graphs import CodePredictorGraph, DecodeStepGraph
from omni_runtime.layers import DenseMLP, StepContext
from omni_runtime.models.talker import Talker
from omni_runtime.sampling import Sampler, SamplingParams


class TalkerRunner:
    def __init__(self, talker: Talker, cfg: TalkerConfig, max_len: int, device: torch.device, dtype: torch.dtype):
        self.talker, self.cfg = talker, cfg
        self.state = DecoderState(cfg.text, max_len, device, dtype)
        self.predictor = DecoderState(cfg.code_predictor, cfg.num_code_groups, device, dtype, multimodal_rope=False)
        self.predictor_contexts = self._predictor_contexts()
        self.frame_weights = self._frame_weights() if device.type == "cpu" and dtype == torch.float32 else None
        self.greedy_predictor = Sampler(SamplingParams(temperature=0.0), device)
        vocab = cfg.text.vocab_size
        # Codebook 0 never draws the codec's special codes, except the end of speech (the reference's suppress list).
        self.code0_suppress = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.code0_suppress[vocab - 1024:] = True
        self.code0_suppress[cfg.codec_eos] = False
        self.code0_seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)   # this answer's codebook-0 codes
        self.predictor_graph = CodePredictorGraph(
            lambda hidden, code0: self._predict(hidden, code0, self.greedy_predictor), cfg.text.hidden_size, dtype,
            device)
        # Sampled frames: one graph per (temperature, top-k, top-p), all drawing from this runner's generator, which
        # each request reseeds with its own predictor seed (see predict_residuals).
        self.predictor_generator: torch.Generator | None = None   # the runner's own draws (see use_frame_graphs)
        self.talker_generator: torch.Generator | None = None
        self.sampled_predictor_graphs: dict[tuple, CodePredictorGraph] = {}
        self.seeded_for: Sampler | None = None
        self.decode_graph: DecodeStepGraph | None = None
        self.frame_capture: bool | None = None                 # None: frames run step by step (see frame)
        self.frame_graphs: dict[tuple, DecodeStepGraph] = {}   # per (talker, predictor) warpers
        self.code0_draws: dict[tuple, Sampler] = {}            # codebook-0 samplers on the runner's generator
        self.step_weights = self.state.one_call_weights(talker.model.layers, talker.model.norm.weight,
                                                        talker.codec_head.weight)
        if device.type == "cuda":
            self.use_decode_graph()
            self.use_frame_graphs()

    def use_decode_graph(self, capture: bool = True) -> None:
        """Decode through one static step (captured as a CUDA graph on a GPU; eager with ``capture=False``)."""
        embeds = torch.zeros(1, 1, self.cfg.text.hidden_size, dtype=self.state.dtype, device=self.state.device)
        self.decode_graph = DecodeStepGraph(self._decode_step, self.state, embeds, capture)

    def use_frame_graphs(self, capture: bool = True) -> None:
        """Run each frame as one static step (captured as a CUDA graph on a GPU; eager with ``capture=False``, as
        tests do on CPU). Its draws come from the runner's generators, so the predictor's do too from now on."""
        device = self.state.device
        if self.talker_generator is None:
            self.talker_generator, self.predictor_generator = torch.Generator(device), torch.Generator(device)
        self.frame_capture = capture
        self.frame_graphs.clear()
        self.code0_draws.clear()
        self.sampled_predictor_graphs.clear()
        self.seeded_for = None

    def _decode_step(self, embeds: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.talker.model(embeds, ctx, self.state.cache)
        return self.talker.codec_head(hidden)[:, -1].float(), hidden

    def _predictor_contexts(self) -> list[StepContext]:
        """The prefill of (talker state, codebook-0 embedding) at positions 0-1, then one position per codebook."""
        state = self.predictor
        contexts = [state.start(torch.arange(2, device=state.device).view(1, -1))]
        return contexts + [state.next_context() for _ in range(self.cfg.num_code_groups - 2)]

    def _frame_weights(self) -> ok.PredictorWeights | None:
        """The predictor's weights as the one-call frame takes them (views, no copies); None for MoE layers."""
        model, cfg = self.talker.code_predictor.model, self.cfg.code_predictor
        if not all(isinstance(layer.mlp, DenseMLP) for layer in model.layers):
            return None
        # the step contexts' own rotary rows, so both paths rotate with the same bits
        cos = torch.cat([ctx.cos[0] for ctx in self.predictor_contexts])                    # [Q, D]
        sin = torch.cat([ctx.sin[0] for ctx in self.predictor_contexts])
        return ok.PredictorWeights(tuple(layer.step_weights() for layer in model.layers), model.norm.weight,
                                   tuple(e.weight for e in model.codec_embedding),
                                   tuple(h.weight for h in self.talker.code_predictor.lm_head), cos, sin,
                                   cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps)

    def begin_answer(self, talker_sampler: Sampler, predictor_sampler: Sampler) -> None:
        """A new spoken answer: its codebook-0 history starts empty; on a GPU the runner's generators restart from
        the samplers' seeds."""
        self.code0_seen.zero_()
        if self.talker_generator is not None:
            if talker_sampler.generator is not None:
                self.talker_generator.manual_seed(talker_sampler.generator.initial_seed())
            if predictor_sampler.generator is not None:
                self.predictor_generator.manual_seed(predictor_sampler.generator.initial_seed())
            self.seeded_for = predictor_sampler

    def sample_code0(self, logits: torch.Tensor, sampler: Sampler) -> torch.Tensor:
        """logits: [1, V] fp32 -> codebook-0 code [1], penalised by and added to this answer's history."""
        return self._draw_code0(self._code0_sampler(sampler), logits)

    def _draw_code0(self, sampler: Sampler, logits: torch.Tensor) -> torch.Tensor:
        code0 = sampler(logits, seen=self.code0_seen)
        self.code0_seen.scatter_(1, code0.view(1, 1), True)
        return code0

    def _code0_sampler(self, sampler: Sampler) -> Sampler:
        # Once the runner draws itself, codebook 0 draws from its generator: one sampler per setting (the frame
        # graphs capture it, with the suppress mask it holds: the runner's, or none).
        if self.talker_generator is None or sampler.params.greedy:
            return sampler
        if sampler.suppress is not None and sampler.suppress is not self.code0_suppress:
            return Sampler(sampler.params, self.state.device, sampler.suppress, generator=self.talker_generator)
        key = (sampler.params.warpers, sampler.suppress is None)
        if key not in self.code0_draws:
            self.code0_draws[key] = Sampler(sampler.params, self.state.device, sampler.suppress,
                                            generator=self.talker_generator)
        return self.code0_draws[key]

    @torch.inference_mode()
    def frame(self, frame_embed: torch.Tensor, text_row: torch.Tensor, talker_sampler: Sampler,
              predictor_sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One frame after the first: the talker step on the previous frame's embedding plus its text row
        (both [1, 1, H]), the codebook-0 draw, the predictor frame -> (code0 [1], codes of codebooks 1..Q-1 [Q-1],
        this frame's embedding [1, 1, H]). ``begin_answer`` first."""
        graph = self._frame_graph(talker_sampler, predictor_sampler)
        if graph is not None:
            return graph(frame_embed, text_row)
        logits, hidden = self.decode(frame_embed + text_row)
        code0 = self.sample_code0(logits, talker_sampler)
        residuals, frame_embed = self.predict_residuals(hidden, code0, predictor_sampler)
        return code0, residuals, frame_embed

    def _frame_graph(self, talker_sampler: Sampler, predictor_sampler: Sampler) -> DecodeStepGraph | None:
        suppress = talker_sampler.suppress
        if self.frame_capture is None or (suppress is not None and suppress is not self.code0_suppress):
            return None
        key = (talker_sampler.params.warpers, suppress is None, predictor_sampler.params.warpers)
        if key not in self.frame_graphs:
            code0_draw = self._code0_sampler(talker_sampler)
            predictor_draw = (self.greedy_predictor if predictor_sampler.params.greedy else
                              Sampler(predictor_sampler.params, self.state.device,
                                      generator=self.predictor_generator))

            def frame(frame_embed, text_row, ctx):
                logits, hidden = self._decode_step(frame_embed + text_row, ctx)
                code0 = self._draw_code0(code0_draw, logits)
                return (code0, *self._predict(hidden, code0, predictor_draw))

            drawing = ((self.talker_generator, code0_draw), (self.predictor_generator, predictor_draw))
            generators = tuple(g for g, sampler in drawing if not sampler.params.greedy)
            embed_like = torch.zeros(1, 1, self.cfg.text.hidden_size, dtype=self.state.dtype,
                                     device=self.state.device)
            self.frame_graphs[key] = DecodeStepGraph(frame, self.state, (embed_like, embed_like), self.frame_capture,
                                                     generators=generators, buffers=(self.code0_seen,))
        return self.frame_graphs[key]

    @property
    def max_len(self) -> int:
        return self.state.cache.max_len

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds: [1, L, H], positions: [3, 1, L] -> (codec logits fp32 [1, V], last post-norm hidden [1, 1, H])."""
        hidden = self.talker.model(embeds, self.state.start(positions), self.state.cache)
        return self.talker.codec_head(hidden)[:, -1].float(), hidden[:, -1:]

    @torch.inference_mode()
    def decode(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds: [1, 1, H] -> (codec logits fp32 [1, V], post-norm hidden [1, 1, H])."""
        if self.decode_graph is not None:
            return self.decode_graph(embeds)
        if self.state.steps_in_one_call(self.step_weights):   # CPU: the C++ twin of the step
            hidden, logits = self.state.step_in_one_call(embeds.view(1, -1), self.step_weights)
            return logits, hidden.view(1, 1, -1)
        return self._decode_step(embeds, self.state.next_context())

    @torch.inference_mode()
    def predict_residuals(self, hidden: torch.Tensor, code0: torch.Tensor,
                          sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: [1, 1, H] talker state that produced ``code0`` ([1]) -> (codes of codebooks 1..Q-1 [Q-1],
        the next talker input before text conditioning: the sum of the frame's Q code embeddings [1, 1, H]).
        On a CPU (fp32) a frame is one call of the C++ twin. On a GPU frames replay a captured CUDA graph. Draws
        come from ``sampler``'s generator, or once the runner has its own (a GPU, ``use_frame_graphs``) from the
        runner's, reseeded with ``sampler``'s seed when a new sampler (a new request) comes: the same codes as
        eager draws from ``sampler``'s own generator."""
        p = sampler.params
        if self.predictor_generator is not None and not p.greedy and sampler is not self.seeded_for:
            self.predictor_generator.manual_seed(sampler.generator.initial_seed())
            self.seeded_for = sampler
        generator = sampler.generator if self.predictor_generator is None else self.predictor_generator
        if (self.frame_weights is not None and sampler.suppress is None
                and ok.selected_backend("code_predictor_frame", self.state.device) == "cpp"):
            return predict_in_one_call(self.talker, self.frame_weights, hidden, code0, p, generator)
        if p.greedy:
            return self.predictor_graph(hidden, code0)
        if self.predictor_generator is None:
            return self._predict(hidden, code0, sampler)
        key = (p.temperature, p.top_k, p.top_p)
        if key not in self.sampled_predictor_graphs:
            drawing = Sampler(SamplingParams(*key), self.state.device, generator=self.predictor_generator)
            self.sampled_predictor_graphs[key] = CodePredictorGraph(
                lambda hidden, code0: self._predict(hidden, code0, drawing), self.cfg.text.hidden_size,
                self.state.dtype, self.state.device, generator=self.predictor_generator)
        return self.sampled_predictor_graphs[key](hidden, code0)

    def _predict(self, hidden: torch.Tensor, code0: torch.Tensor,
                 sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
        predictor = self.talker.code_predictor
        embeds = [self.talker.model.codec_embedding(code0.view(1, 1))]                    # Q x [1, 1, H]
        x = torch.cat([hidden, embeds[0]], dim=1)                                         # [1, 2, H]
        codes = []
        for group, ctx in enumerate(self.predictor_contexts):
            out = predictor.model(x, ctx, self.predictor.cache)
            codes.append(sampler(predictor.lm_head[group](out)[:, -1].float()))          # [1]
            x = predictor.model.codec_embedding[group](codes[-1].view(1, 1))
            embeds.append(x)
        return torch.cat(codes), torch.cat(embeds, dim=1).sum(1, keepdim=True)


def predict_in_one_call(talker: Talker, weights: ok.PredictorWeights, hidden: torch.Tensor, code0: torch.Tensor,
                        params: SamplingParams, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One predictor frame through ``ok.code_predictor_frame`` (the C++ twin on a CPU): hidden [1, 1, H],
    code0 [1] -> (codes of codebooks 1..Q-1 [Q-1], frame embedding [1, 1, H])."""
    prefix = torch.cat([hidden[0], talker.model.codec_embedding(code0)])                      # [2, H]
    codes, embed_sum = ok.code_predictor_frame(prefix, weights, params.temperature, params.top_k, params.top_p,
                                               generator)
    return codes, embed_sum.view(1, 1, -1)
