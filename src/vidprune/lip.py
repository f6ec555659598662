"""LIP in the runtime: one span over the whole block stack that computes only the tokens the
source video's keep mask keeps, Attention Recovery in the self-attention, and restoration of
the pruned tokens' outputs from their references.

The mask comes from the clean source latents of a video-to-video pipeline call (the adapter's
video_to_video_pipelines): while the call runs, the pipeline's VAE encoder is watched and its
output (the mode of the latent distribution: noise-free, also where the pipeline samples it)
normalised as the adapter says the pipeline does. Or from LipConfig(source_latents=...) or
LipConfig(mask=...), or, for a family whose forwards carry the source video (VACE's control
latents), from the forward's inputs (`Adapter.lip_keep_mask`). The tokens the family computes in
every span (`Adapter.leading_tokens`) join the mask. LIP works on latents (batch, channels,
frames, height, width); the adapter converts a model whose latents are laid out otherwise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .config import LipConfig
from .interframe import keep_mask, reference_index
from .parallel import SequenceShard, balance_keep
from .recovery import RecoveryKeys, recovery_keys, restore_from_references
from .refresh import remember_span
from .runtime import (
    CallState,
    ForwardState,
    OpenSpan,
    Span,
    TokenPruner,
    spans_from_starts,
)
from .tape import Candidates, Selector, TapeState
from .tokens import TokenGrid


@dataclass(frozen=True)
class LipMask:
    """What LIP's keep mask means for the runtime, computed once per call."""

    computed: torch.Tensor  # (tokens,) bool: the tokens LIP computes (union over the batch's videos)
    index: torch.Tensor  # (1, kept) sorted kept token indices
    reference: torch.Tensor  # (tokens,) each token's reference (kept tokens: themselves)
    keys: RecoveryKeys | None  # key positions of recovered attention over all kept tokens (None: no recovery)
    frame_counts: tuple[int, ...]  # kept tokens in each frame (host ints, for TAPE's budgets)


class LipState(CallState):
    def reset(self, pipeline: Any = None) -> None:
        super().reset(pipeline)
        self.encoded: list[torch.Tensor] = []  # VAE encodings seen during the call
        self.lip_mask: LipMask | None = None
        self.clean: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # per text: per layer (k, v)
        self.recording: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.tape: TapeState | None = None  # TAPE's per-call state when LipConfig.tape is set
        self.candidates: Candidates | None = None  # what TAPE's spans choose from: LIP's kept tokens
        self.tape_keys: dict[int, tuple[torch.Tensor, RecoveryKeys]] = {}  # span start -> (its index, its keys)
        if self.config.tape is not None:
            self.tape = TapeState(self.config.tape)
            self.tape.reset(pipeline)

    @contextlib.contextmanager
    def call(self, pipeline: Any) -> Iterator[None]:
        """Reset, and watch the pipeline's VAE encoder for the source video during the call."""
        with super().call(pipeline):
            vae = getattr(pipeline, "vae", None)
            if vae is None:
                yield
                return
            encode = vae.encode

            def watched_encode(*args, **kwargs):
                output = encode(*args, **kwargs)
                self.encoded.append(output.latent_dist.mode())
                return output

            vae.encode = watched_encode
            try:
                yield
            finally:
                del vae.encode  # the class's method shows through again

    def source_latents(self, adapter: Any) -> torch.Tensor | None:
        """The call's clean source latents (batch, channels, frames, height, width): given in the
        config, or the call's VAE encodings normalised as the adapter's pipelines do."""
        if self.config.source_latents is not None:
            return self.config.source_latents
        if not self.encoded:
            return None
        return adapter.source_latents(self.pipeline, torch.cat(self.encoded))


class LipPruner(TokenPruner):
    """One span over all blocks; with LipConfig.tape, LIP-only layers up to TAPE's first pruned
    layer, then TAPE's spans, each on a subset of LIP's kept tokens. LIP-pruned tokens are in
    no span and are restored at the output either way."""

    def __init__(self, transformer: torch.nn.Module, adapter, config: LipConfig, state: LipState) -> None:
        num_layers = len(adapter.blocks(transformer))
        spans = [Span(0, num_layers - 1)]
        self.first_tape_layer = num_layers
        if config.tape is not None:
            starts = config.tape.span_starts(num_layers)
            self.first_tape_layer = starts[0]
            spans = [Span(0, starts[0] - 1)] * (starts[0] > 0) + spans_from_starts(starts, num_layers)
        super().__init__(transformer, adapter, config, state, spans)
        self._originals: list[tuple[torch.nn.Module, Any]] = []
        self.partner_selections: dict[int, torch.Tensor] | None = None  # TAPE selections of this step's first CFG call
        self.selections: dict[int, torch.Tensor] = {}
        self.selector = Selector(adapter, config.tape) if config.tape is not None else None
        self.x0_coefficients: tuple[float, float] | None = None  # this forward's, for restore="x0"

    # -- processors -------------------------------------------------------------------
    def on_attach(self) -> None:
        if not self.config.recovery:
            return
        for layer, block in enumerate(self.adapter.blocks(self.transformer)):
            attention = self.adapter.self_attention(block)
            self._originals.append((attention, attention.processor))
            attention.processor = self.adapter.recovery_processor(attention.processor, self, layer)

    def check_graphs(self) -> None:
        if self.config.kv_source == "clean":
            raise ValueError("LipConfig(kv_source='clean') is not supported with compile_blocks(graphs=True) (its "
                             "recorded keys and values differ per guidance branch); use kv_source='current' (the default)")

    def on_detach(self) -> None:
        for attention, processor in self._originals:
            attention.processor = processor
        self._originals = []

    def check_parallel(self, shard: SequenceShard) -> None:
        super().check_parallel(shard)
        if self.config.tape is not None:
            raise ValueError("LipConfig(tape=...) is not supported under context parallelism (TAPE's budgets among "
                             "LIP's kept tokens are not balanced over the ranks): use LIP alone, or TAPE alone")

    # -- per forward --------------------------------------------------------------------
    def handles_forward(self) -> bool:
        return self.state.recording is None

    def extends_attention(self) -> bool:
        # LIP's span covers every block; its clean pass records keys outside any forward's span.
        current = self.state.current
        return self.state.recording is not None or (current is not None and current.active)

    def plan_forward(self, current: ForwardState) -> None:
        lip_mask = self._lip_mask(current)
        keep = lip_mask.index.shape[1] / current.grid.size
        current.active = keep < 1.0
        tape = self.state.tape
        if tape is not None:
            step, tape_keep = tape.step_and_keep(current.sigma, self.adapter)
            pruning = tape_keep < 1.0
            current.active |= pruning or tape.remembers(current.branch)
            batch = current.inputs["hidden_states"].shape[0]
            self.partner_selections, self.selections = tape.selections_for(current.sigma, batch, pruning)
            current.tape_keep = tape_keep
            current.record.step, current.record.shared_selection = step, self.partner_selections is not None and pruning
            keep *= tape_keep  # the share TAPE's spans compute, up to per-frame rounding
        current.record.keep = keep
        if current.active:  # asked before the forward computes anything: a refusal changes nothing
            lowest, timestep = torch.stack(torch.aminmax(current.inputs[self.adapter.timestep_argument].float())).tolist()
            if self.config.restore == "x0" and lowest != timestep:  # one host sync for both
                # Per-token timesteps (Wan2.2 TI2V's clean first frame): a reference's clean
                # estimate would need its own noise level, and restoration has one per forward.
                raise ValueError("LipConfig(restore='x0') takes one timestep per forward: this forward gives its "
                                 "tokens different timesteps (a conditioning frame's); use restore='prediction'")
            self.x0_coefficients = (self.adapter.x0_coefficients(self.state.scheduler, timestep, current.sigma)
                                    if self.config.restore == "x0" else None)
        if current.active and self.config.recovery and self.config.kv_source == "clean":
            self._clean_pass(current)

    def _remembers_now(self) -> bool:
        return self.state.tape is not None and self.state.tape.remembers(self.state.current.branch)

    def held_bytes(self) -> int:
        return self.state.tape.memory_bytes() if self.state.tape is not None else 0

    def _memory(self, span_start: int):
        return self.state.tape.memory_of(self.transformer, span_start, self.state.current.branch)

    def select(self, block: torch.nn.Module, inputs: dict[str, Any], span: Span) -> torch.Tensor:
        current, lip_mask = self.state.current, self.state.lip_mask
        # LIP's mask and TAPE's selections hold the tokens every span computes (ForwardState.leading).
        index = lip_mask.index if span.start < self.first_tape_layer else self._tape_select(block, inputs, span)
        if self.config.recovery and index is lip_mask.index:
            current.span.recovery_keys = lip_mask.keys
        elif self.config.recovery:
            # The CFG partner call reuses the selection (the same tensor), so it reuses its keys too.
            cached = self.state.tape_keys.get(span.start)
            if cached is None or cached[0] is not index:
                computed = torch.zeros_like(lip_mask.computed).index_fill_(0, index[0], True)
                keys = recovery_keys(computed, lip_mask.reference, current.grid, self.config.duplicates)
                cached = self.state.tape_keys[span.start] = (index, keys)
            current.span.recovery_keys = cached[1]
        return index

    def _tape_select(self, block: torch.nn.Module, inputs: dict[str, Any], span: Span) -> torch.Tensor:
        """TAPE's selection among LIP's kept tokens: every LIP-kept token while the span's
        memory is empty or the step is dense."""
        current, lip_mask, tape = self.state.current, self.state.lip_mask, self.state.tape
        if current.tape_keep >= 1.0:
            return lip_mask.index
        memory = self._memory(span.start) if self._remembers_now() else None
        if memory is not None and not memory.filled:
            return lip_mask.index
        if self.partner_selections is not None and span.start in self.partner_selections:
            return self.partner_selections[span.start]
        if tape.config.refreshes and memory.compared_input is None:
            return lip_mask.index  # this branch has no history to select with
        if self.state.candidates is None:  # once per call: LIP-pruned tokens hold stale states, no say as queries
            queries = tape.queries(current.grid, inputs["hidden_states"].device)
            self.state.candidates = Candidates(lip_mask.computed, lip_mask.frame_counts, lip_mask.reference,
                                               queries[lip_mask.computed[queries]])
        index = self.selector(block, inputs, tape, current, span.start, current.tape_keep, memory, self.state.candidates)
        self.selections[span.start] = index
        return index

    def finish_span(self, span: Span, open_span: OpenSpan, kept_output: torch.Tensor) -> torch.Tensor:
        if span.start < self.first_tape_layer or not self._remembers_now():
            return super().finish_span(span, open_span, kept_output)
        tape = self.config.tape
        index = None if open_span.index is self.state.lip_mask.index else open_span.index
        # With index None (every LIP-kept token computed), the LIP-pruned rows pass unchanged;
        # nothing reads them: they are restored at the model output.
        full = super().finish_span(span, open_span, kept_output) if index is None else kept_output
        tracks = self.state.tape.tracks_history(self.state.current.branch)
        return remember_span(self._memory(span.start), open_span.input, index, full, tape.cache, tracks,
                             change_since=tape.change_since)

    def records_selections(self, span: Span) -> bool:
        # LIP's own index is one per call: keeping it costs nothing. TAPE's change per step.
        return span.start < self.first_tape_layer or self.config.tape.record_selections

    def attention_keys(self) -> int | None:
        span = self.state.current.span
        keys = span.recovery_keys if self.config.recovery and span is not None else None
        return None if keys is None else keys.positions.shape[0]

    def finish_forward(self, current: ForwardState, output: Any) -> Any:
        sample = output[0] if isinstance(output, tuple) else output.sample
        adapter, transformer, inputs = self.adapter, self.transformer, current.inputs
        restored = adapter.from_video_layout(transformer, inputs, restore_from_references(
            adapter.to_video_layout(transformer, inputs, sample), adapter.noisy_latents(transformer, inputs),
            self.state.lip_mask.reference, adapter.patch_size(transformer), self.x0_coefficients,
            self.config.restore,
        ))
        if isinstance(output, tuple):
            return (restored, *output[1:])
        output.sample = restored
        return output

    def clean_keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """The kept tokens' keys and values of `layer` from the clean pass (None, None if the
        duplicates come from the current step)."""
        if self.config.kv_source != "clean":
            return None, None
        return self.state.clean[self.state.current.branch][layer]

    # -- helpers ------------------------------------------------------------------------
    def _lip_mask(self, current: ForwardState) -> LipMask:
        state, grid = self.state, current.grid
        # A mask from the forward's inputs is the call's (its pipeline passes the same ones at every
        # step); a bare transformer's forwards stand alone.
        from_inputs = self.config.mask is None and self.adapter.lip_source_in_forward
        if (state.lip_mask is not None and state.lip_mask.computed.shape[0] == grid.size
                and (state.in_call or not from_inputs)):
            return state.lip_mask
        noisy = self.adapter.noisy_latents(self.transformer, current.inputs)
        patch = self.adapter.patch_size(self.transformer)
        if any(size % p for size, p in zip(noisy.shape[2:], patch)):
            raise ValueError(f"LIP needs latent (frames, height, width) divisible by the patch size {patch}; this call's "
                             f"latents are {tuple(noisy.shape[2:])}: choose a video size whose latents divide evenly")
        if from_inputs:
            mask = self.adapter.lip_keep_mask(self.transformer, current.inputs, self.config.detection)
        else:
            mask = self._mask(grid, noisy)
        keep = mask.to(noisy.device).any(dim=0).flatten()  # a token is computed if any video of the batch needs it
        keep[:current.leading] = True  # with the tokens every span computes
        reference = self._reference(keep, grid)
        if current.shard is not None:  # equal kept counts per rank: attention exchanges equal chunks
            keep = balance_keep(keep, reference, grid, current.shard.world)
            reference = self._reference(keep, grid)
        keys = recovery_keys(keep, reference, grid, self.config.duplicates) if self.config.recovery else None
        counts = tuple(keep.view(grid.frames, -1).sum(dim=1).tolist())
        state.lip_mask = LipMask(keep, keep.nonzero().view(1, -1), reference, keys, counts)
        state.candidates = None  # TAPE's candidates are LIP's kept tokens
        return state.lip_mask

    @staticmethod
    def _reference(keep: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        return reference_index(keep.view(1, grid.frames, grid.height, grid.width))[0]

    def _mask(self, grid: TokenGrid, noisy: torch.Tensor) -> torch.Tensor:
        """The (batch or 1, frames, height, width) keep mask of this call, checked against it."""
        expected, batch = (grid.frames, grid.height, grid.width), noisy.shape[0]
        if self.config.mask is not None:
            mask = self.config.mask if self.config.mask.ndim == 4 else self.config.mask.unsqueeze(0)
            if mask.shape[0] not in (1, batch):
                raise ValueError(f"LipConfig.mask holds {mask.shape[0]} masks for a call of {batch} videos: give one "
                                 f"mask (frames, height, width) or one per video ({batch}, ...)")
            if tuple(mask.shape[1:]) != expected:
                raise ValueError(
                    f"mask of shape {tuple(self.config.mask.shape)} does not fit this video: LipConfig.mask must be "
                    f"(frames, height, width) = {expected} or (batch, {', '.join(map(str, expected))}) over the token grid"
                )
            if not mask[:, 0].all():
                raise ValueError("LipConfig.mask must keep every token of frame 0 (pruned tokens copy earlier frames)")
            return mask
        source = self.state.source_latents(self.adapter)
        if source is None:
            raise ValueError(
                f"LIP needs the source video: run it through a video-to-video pipeline "
                f"({', '.join(self.adapter.video_to_video_pipelines)}) with video=..., or give "
                "LipConfig(source_latents=...) or LipConfig(mask=...)"
            )
        if tuple(source.shape[1:]) != tuple(noisy.shape[1:]) or source.shape[0] not in (1, batch):
            raise ValueError(f"source latents of shape {tuple(source.shape)} do not fit this call's latents "
                             f"{tuple(noisy.shape)}: they must be ({'1' if batch == 1 else f'1 or {batch}'}, "
                             f"{', '.join(map(str, noisy.shape[1:]))})")
        if not torch.isfinite(source).all():
            raise ValueError("the source latents hold NaN or infinite values: LIP cannot measure change on them")
        return keep_mask(source, self.adapter.patch_size(self.transformer), self.config.detection)

    def _clean_pass(self, current: ForwardState) -> None:
        """Run the clean source latents at t = 0 once per call and text, recording every
        layer's keys and values of the kept tokens (the processors do the recording)."""
        state, key = self.state, current.branch
        if key in state.clean:
            return
        source = state.source_latents(self.adapter)
        if source is None:
            raise ValueError(
                "kv_source='clean' needs the source video: call a video-to-video pipeline with video=..., "
                "or give LipConfig(source_latents=...)"
            )
        batch = current.inputs["hidden_states"].shape[0]
        inputs = self.adapter.with_noisy_latents(self.transformer, current.inputs, source.expand(batch, -1, -1, -1, -1))
        inputs[self.adapter.timestep_argument] = torch.zeros_like(inputs[self.adapter.timestep_argument])
        state.recording = []
        try:
            self.transformer(**inputs)
            state.clean[key] = state.recording
        finally:
            state.recording = None
