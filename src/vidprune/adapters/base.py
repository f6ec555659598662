"""What the runtime needs to know about a model family. One subclass per family."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..tokens import TokenGrid


@dataclass(frozen=True)
class BenchmarkShape:
    """A random-weight model of a published size, for speed benchmarks (latency does not
    depend on the weights). `bench.build_random_pipeline` builds it from these numbers alone."""

    family: str  # the model family as benchmarks name it, e.g. "wan2.1"
    config: dict  # the diffusers transformer's config (its __init__ keyword arguments)
    video: tuple[int, int, int]  # the usual call: frames, height, width in pixels
    text: tuple[int, int]  # the prompt embedding the pipeline passes: tokens, width
    vae: tuple[int, int]  # the VAE's (temporal, spatial) compression: the latent geometry
    source: str  # where the numbers come from
    tiny: bool = False  # a few-layer model for CPU tests, not a published size
    experts: int = 1  # transformers of the pipeline (Wan2.2 A14B: two experts)
    guidance_scale: float = 5.0  # the pipeline's usual guidance (CFG, or embedded guidance)
    notes: tuple[str, ...] = field(default=())  # what a reader of the numbers must know


def random_text(shape: BenchmarkShape, prompts: int, generator: torch.Generator, device: str,
                dtype: torch.dtype) -> list[torch.Tensor]:
    """`prompts` random prompt embeddings (1, tokens, width) of `shape`, drawn on the CPU so that
    every device gets the same numbers."""
    return [torch.randn(1, *shape.text, generator=generator).to(device, dtype) for _ in range(prompts)]


class Adapter:
    """Model knowledge for one family of diffusers video transformers.

    Block inputs are handled as a dict of the block's forward arguments by name; the runtime
    binds positional calls to names with the block's signature.
    """

    #: diffusers transformer classes this adapter handles
    model_classes: tuple[type, ...] = ()
    #: the transformer forward argument that carries the denoising timestep
    timestep_argument: str = "timestep"

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        """The stack of transformer blocks, in execution order."""
        raise NotImplementedError

    #: pipeline classes whose source video LIP can read (video-to-video editing)
    video_to_video_pipelines: tuple[str, ...] = ()
    #: whether LIP (noisy_latents, with_noisy_latents, recovery_processor) is implemented
    supports_lip: bool = True
    #: whether every forward carries the source video LIP prunes against among its own inputs
    #: (VACE's control latents): then `lip_keep_mask` gives LIP's mask, in a pipeline call or on
    #: a bare transformer, and LIP asks the pipeline and the config for no source video
    lip_source_in_forward: bool = False
    #: whether the family's pipelines run both CFG branches in one forward, batched as
    #: [unconditional; conditional] halves (True), or call the transformer once per branch
    guidance_batched: bool = False
    #: whether TAPE's cache="block" (branch_modules, replay_block) is implemented
    supports_block_cache: bool = True
    #: whether pruning inside diffusers' context parallelism is implemented: the model's
    #: `_cp_plan` splits the video tokens into equal contiguous chunks before the first block
    #: (with every per-token block input) and gathers them after the last
    supports_context_parallel: bool = False
    #: the family's text-to-video pipeline classes (what `vidprune generate --model` loads)
    text_to_video_pipelines: tuple[str, ...] = ()
    #: whether every `vidprune bench` method runs on the family; else TAPE and FirstBlockCache
    #: only (the other caches are set up with Wan's module names and call order, LIP is Wan's)
    runs_every_bench_method: bool = False
    #: whether the family's pipelines open diffusers' cache context around their transformer
    #: calls, where diffusers' step caches (FirstBlockCache, MagCache, ...) keep their state
    sets_cache_context: bool = True
    #: random-weight models of the family's published sizes, by name (`BenchmarkShape`)
    benchmark_shapes: dict[str, BenchmarkShape] = {}

    def benchmark_pipeline(self, transformers: list[torch.nn.Module], shape: BenchmarkShape) -> Any:
        """The family's text-to-video pipeline around random-weight `transformers`, with no text
        encoder and no VAE (calls pass prompt embeddings and output_type="latent"), and the
        latent geometry of `shape`."""
        raise NotImplementedError

    def benchmark_call(self, shape: BenchmarkShape, device: str, dtype: torch.dtype,
                       generator: torch.Generator) -> dict[str, Any]:
        """The pipeline call arguments of the usual call of `shape` without the step count:
        random prompt embeddings (and what else the pipeline takes with them), the video size,
        the usual guidance, output_type="latent". By default a CFG pipeline's: prompt and
        negative prompt embeddings."""
        positive, negative = random_text(shape, 2, generator, device, dtype)
        frames, height, width = shape.video
        return dict(prompt_embeds=positive, negative_prompt_embeds=negative, guidance_scale=shape.guidance_scale,
                    num_frames=frames, height=height, width=width, output_type="latent")

    def check_graphs(self, transformer: torch.nn.Module) -> None:
        """Raise ValueError if this model's pruned spans cannot run as CUDA graphs (a gathered
        block input that is a Python number fixed at capture, say)."""

    def patch_size(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        """Latent (frames, height, width) covered by one token."""
        raise NotImplementedError

    def guidance_in_batch(self, pipeline: Any) -> bool:
        """Whether this pipeline call's forwards carry both CFG branches as halves of the batch."""
        return self.guidance_batched and bool(getattr(pipeline, "do_classifier_free_guidance", False))

    #: whether a block returns (video hidden states, text hidden states), as joint-attention
    #: blocks do, instead of the video hidden states alone
    returns_text_stream: bool = False

    def split_block_output(self, output: Any) -> tuple[torch.Tensor, Any]:
        """A block's output as (video hidden states, the rest): the rest passes a pruned span's
        last block as the block produced it."""
        return (output[0], output[1]) if self.returns_text_stream else (output, None)

    def join_block_output(self, hidden_states: torch.Tensor, rest: Any) -> Any:
        """Inverse of split_block_output."""
        return (hidden_states, rest) if self.returns_text_stream else hidden_states

    def next_block_inputs(self, inputs: dict[str, Any], output: Any) -> dict[str, Any]:
        """The next block's arguments by name, from a block's arguments and output, as the
        transformer's block loop passes them on (for running a span's blocks in a row)."""
        hidden_states, rest = self.split_block_output(output)
        text = {"encoder_hidden_states": rest} if self.returns_text_stream else {}
        return {**inputs, "hidden_states": hidden_states, **text}

    def token_grid(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> TokenGrid:
        """Token grid of a forward, from its arguments by name. By default from the latents
        `hidden_states` (batch, channels, frames, height, width); a model that takes packed
        tokens reads the grid from the arguments that give it."""
        p_t, p_h, p_w = self.patch_size(transformer)
        _, _, frames, height, width = inputs["hidden_states"].shape
        return TokenGrid(frames // p_t, height // p_h, width // p_w)

    def prefix_tokens(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> int:
        """How many tokens the blocks' hidden states hold before the token grid's in a forward
        with arguments `inputs` (FramePack's history latents): context that every span computes
        whole, outside any selection, as the family's model lays them out: 0 by default."""
        return 0

    def context_tokens(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> int:
        """How many conditioning tokens (text, and what the model adds to them) the blocks attend
        to besides the video, for the FLOPs estimate: by default the `encoder_hidden_states`'."""
        context = inputs.get("encoder_hidden_states")
        return context.shape[1] if context is not None else 0

    def model_starts(self, pipeline: Any, timesteps: list[float]) -> list[int]:
        """Indices of the steps (of a call running `timesteps`) at which the pipeline hands
        denoising to another of its transformers; none by default."""
        return []

    def noisy_latents(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """The noisy latents (batch, channels, frames, height, width) among a forward's inputs,
        without any conditioning channels the model takes beside them."""
        raise NotImplementedError

    def to_video_layout(self, transformer: torch.nn.Module, inputs: dict[str, Any],
                        latents: torch.Tensor) -> torch.Tensor:
        """Latents in the transformer's layout (its input and output) as (batch, channels,
        frames, height, width), the layout LIP works in; by default they are already. `inputs`
        are the forward's arguments by name (a model taking packed tokens reads the grid there)."""
        return latents

    def from_video_layout(self, transformer: torch.nn.Module, inputs: dict[str, Any],
                          latents: torch.Tensor) -> torch.Tensor:
        """Inverse of to_video_layout."""
        return latents

    def source_latents(self, pipeline: Any, encodings: torch.Tensor) -> torch.Tensor:
        """The clean source latents (batch, channels, frames, height, width) of a video-to-video
        call, from the modes of the VAE encodings it made, normalised as the family's pipelines
        normalise them before adding noise."""
        raise NotImplementedError

    def lip_keep_mask(self, transformer: torch.nn.Module, inputs: dict[str, Any], detection: Any) -> torch.Tensor:
        """With `lip_source_in_forward`: LIP's keep mask (batch, frames, height, width) over the
        token grid, True = computed, frame 0 all True, from a forward's arguments by name and the
        config's LipDetection."""
        raise NotImplementedError

    def check_lip(self, config: Any) -> None:
        """Raise ValueError, naming what is accepted, for a LipConfig this family's LIP cannot
        run (checked by `apply`, before anything changes); nothing by default."""

    def x0_coefficients(self, scheduler: Any, timestep: float, sigma: float) -> tuple[float, float]:
        """(a, b) with which a forward's output o at noisy latents x_t gives the clean-sample
        estimate x0 = a * x_t - b * o. `timestep` is the forward's, sigma = timestep /
        num_train_timesteps. By default a flow-matching velocity, x_t = (1 - sigma) x0 + sigma
        noise and o = noise - x0: (1, sigma). A ValueError when the call's scheduler does not say."""
        return 1.0, sigma

    def with_noisy_latents(self, transformer: torch.nn.Module, inputs: dict[str, Any],
                           latents: torch.Tensor) -> dict[str, Any]:
        """A forward's inputs with `latents` in place of its noisy latents (conditioning kept)."""
        raise NotImplementedError

    def gather_block_inputs(self, inputs: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
        """The per-token block inputs (hidden states, positional tables, per-token modulation)
        restricted to the tokens `index` (batch, kept). Other inputs are left out."""
        raise NotImplementedError

    def query_key(
        self, block: torch.nn.Module, inputs: dict[str, Any], query_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's self-attention queries for tokens `query_index` (1-D) and keys for all
        tokens, as the block computes them (modulation, norms, RoPE), shaped
        (batch, heads, tokens, head_dim)."""
        raise NotImplementedError

    def hidden_size(self, transformer: torch.nn.Module) -> int:
        """Width of the video tokens' hidden states inside the blocks (heads x head width in
        the diffusers configs of every family so far)."""
        return transformer.config.num_attention_heads * transformer.config.attention_head_dim

    def branch_modules(self, block: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
        """The modules whose outputs the block adds to its hidden states (its residual
        branches, e.g. self-attention, cross-attention, feed-forward), in call order."""
        raise NotImplementedError

    def replay_block(self, block: torch.nn.Module, inputs: dict[str, Any], hidden_states: torch.Tensor,
                     branch_outputs: list[torch.Tensor]) -> torch.Tensor:
        """The block's output for `hidden_states` (batch, tokens, dim) when its branches return
        `branch_outputs` (each (batch, tokens, dim), as branch_modules gave them), with the
        modulation of the block's full-length `inputs` (this step's gates)."""
        raise NotImplementedError

    def self_attention(self, block: torch.nn.Module) -> torch.nn.Module:
        """The block's self-attention module (whose processor Attention Recovery replaces)."""
        raise NotImplementedError

    def recovery_processor(self, original: Any, pruner: Any, layer: int) -> Any:
        """An attention processor giving the kept queries the method's extra keys while `pruner`
        prunes (LIP's Attention Recovery; with `supports_full_context`, TAPE's pruned tokens), and
        what `original` does otherwise."""
        raise NotImplementedError

    #: whether TapeConfig(context="full") is implemented: recovery_processor takes the pruned
    #: tokens' keys from the pruner's FullContext, and context_key_value computes them
    supports_full_context: bool = False

    def context_key_value(self, block: torch.nn.Module, inputs: dict[str, Any], hidden_states: torch.Tensor,
                          index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's self-attention key and value (batch, tokens, heads, head_dim), before RoPE,
        of tokens `index` (batch or 1, tokens) whose block input is `hidden_states`, with the
        modulation of the block's full-length `inputs`, as the block computes them."""
        raise NotImplementedError

    def block_flops(self, transformer: torch.nn.Module, tokens: int, context_tokens: int, keys: int | None = None) -> float:
        """Approximate FLOPs of one block on `tokens` video tokens whose self-attention has
        `keys` keys (default: as many as tokens; attention is counted as tokens x keys)."""
        raise NotImplementedError

    def unpruned_flops(self, transformer: torch.nn.Module, tokens: int, context_tokens: int) -> float:
        """Approximate FLOPs of a forward's work outside `blocks` that runs on all `tokens` however
        the blocks prune (VACE's control blocks), counted in the FLOPs a forward spends and would
        spend unpruned; none by default (the embeddings and output head are left out of both)."""
        return 0.0

    def register_hooks(self, pruner: Any, name: str) -> None:
        """Register the diffusers hooks the family needs on modules outside `blocks` (VACE's
        control blocks), under `name`: removing vidprune's hooks removes them with the blocks'.
        None by default."""

    def leading_tokens(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> int:
        """How many tokens at the start of the grid every span computes, whatever a method selects
        (VACE's reference-image frames), from the forward's arguments by name `inputs`; LIP's keep
        mask gets them too. Read once a forward. None by default."""
        return 0


def cross_attention_block_flops(dim: int, ffn_dim: int, tokens: int, context_tokens: int,
                                keys: int | None = None) -> float:
    """FLOPs of a DiT block of width `dim`: self-attention, cross-attention to `context_tokens`
    text tokens (already projected to `dim`) and a two-layer feed-forward of width `ffn_dim`.
    Multiply-adds count 2; norms, modulation and activations are left out."""
    projections = 2 * tokens * dim * dim * 6  # self q, k, v, out; cross q, out
    context_projections = 2 * context_tokens * dim * dim * 2  # cross k, v: not pruned
    self_attention = 2 * 2 * tokens * (tokens if keys is None else keys) * dim
    cross_attention = 2 * 2 * tokens * context_tokens * dim
    feed_forward = 2 * 2 * tokens * dim * ffn_dim
    return float(projections + context_projections + self_attention + cross_attention + feed_forward)


class WrappedProcessor:
    """Base of the attention processors LIP (and TAPE's full context) install: what `original`
    does whenever the method is not pruning, so the settings diffusers puts on every processor (enable_parallelism,
    set_attention_backend) belong to the original (reading one the original lacks fails as on it)."""

    def __init__(self, original: Any, pruner: Any, layer: int) -> None:
        self.original, self.pruner, self.layer = original, pruner, layer

    @property
    def _parallel_config(self) -> Any:
        return self.original._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.original._parallel_config = value

    @property
    def _attention_backend(self) -> Any:
        return self.original._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.original._attention_backend = value

    def record_clean(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """The clean pass (LipConfig(kv_source="clean")): keep the kept tokens' keys and values
        (batch, tokens, ...) for the pruned pass's duplicates."""
        state = self.pruner.state
        kept = state.lip_mask.index[0]
        state.recording.append((key[:, kept], value[:, kept]))

    def pruning(self) -> bool:
        """Whether this call takes the method's keys (LIP's recovered attention, TAPE's full
        context) or records LIP's clean pass; else the original processor runs."""
        return self.pruner.extends_attention()
