"""CUDA graphs of pruned spans: the host launches one graph instead of every kernel of a span.

At LIP's token counts a pruned forward is bound by the CPU launching kernels. A span's work
(gather the kept tokens, run its blocks) has the same shapes at every forward of a call, so it
is captured once and replayed: `SpanGraphs.run` copies the span's inputs into static buffers,
replays the graph, and returns copies of its static outputs.

What makes replays correct:
- everything the captured work reads is an input of `run` (copied into the static buffers before
  each replay): hidden states, modulation, positional tables, the kept index, the recovery keys;
  the only other tensors it reads are the blocks' weights;
- outputs are copied out at once: the next replay (of this graph, or of another sharing its
  memory pool) overwrites them;
- a graph is keyed by the shapes, dtypes and devices of its inputs and by the caller's key (the
  span), so new shapes (a new keep, another mask) capture anew;
- the owner drops the runner at every pipeline call (vidprune's CallState), so nothing captured
  in one call replays in the next (the weights may have been swapped in between, e.g. a LoRA).
Python does not run at replay: the captured work must not depend on host state that changes
between forwards, and must not sync with the host (`.item()`, `nonzero`, boolean indexing).
"""

from __future__ import annotations

import collections
import dataclasses
from collections import OrderedDict
from typing import Any, Callable, Hashable, Protocol

import torch


class Graph(Protocol):
    """A recorded piece of device work: `capture` records fn (its return value: the static
    outputs, valid after a replay), `replay` runs it again on the same memory."""

    def capture(self, fn: Callable[[], Any]) -> Any: ...

    def replay(self) -> None: ...


class CudaGraph:
    """torch.cuda.CUDAGraph with the warm-up on a side stream (lazy initialisations, e.g.
    cuBLAS workspaces, must not happen inside the capture) and a memory pool shared by the
    graphs of one runner (their outputs are copied out after every replay, so sharing is safe)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], Any]) -> Any:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph, pool=self.pool):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class EagerReplayGraph:
    """A stand-in with the Graph interface that works on any device (tests, CPU dry runs of the
    benchmarks): capture records fn and returns output buffers filled with NaN, as a real capture
    computes nothing; replay runs the recorded fn again and writes its result into those buffers."""

    def capture(self, fn: Callable[[], Any]) -> Any:
        self.fn = fn
        self.outputs = map_tensors(lambda t: torch.full_like(t, float("nan")), fn())
        return self.outputs

    def replay(self) -> None:
        for static, new in zip(tensors_of(self.outputs), tensors_of(self.fn())):
            static.copy_(new)


def _flatten(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """obj's structure (dicts, tuples, lists, dataclasses), hashable, with each tensor replaced
    by its position in `tensors` (to which it is appended)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return ("tensor", len(tensors) - 1)
    if isinstance(obj, dict):
        return ("dict", tuple((key, _flatten(value, tensors)) for key, value in obj.items()))
    if isinstance(obj, (tuple, list)):
        return (type(obj), tuple(_flatten(value, tensors) for value in obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj), tuple((f.name, _flatten(getattr(obj, f.name), tensors)) for f in dataclasses.fields(obj)))
    try:
        hash(obj)
    except TypeError:  # an unhashable constant is the same constant only as the same object
        return ("object", id(obj))
    return ("constant", obj)


def _unflatten(spec: Any, tensors: list[torch.Tensor], constants: dict[int, Any]) -> Any:
    kind, content = spec
    if kind == "tensor":
        return tensors[content]
    if kind == "dict":
        return {key: _unflatten(value, tensors, constants) for key, value in content}
    if kind in (tuple, list):
        return kind(_unflatten(value, tensors, constants) for value in content)
    if kind == "constant":
        return content
    if kind == "object":
        return constants[content]
    return kind(**{name: _unflatten(value, tensors, constants) for name, value in content})


def _objects(obj: Any, found: dict[int, Any]) -> dict[int, Any]:
    """The unhashable constants in obj by id (what _flatten keys by identity)."""
    if isinstance(obj, torch.Tensor):
        return found
    if isinstance(obj, dict):
        values = obj.values()
    elif isinstance(obj, (tuple, list)):
        values = obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    else:
        try:
            hash(obj)
        except TypeError:
            found[id(obj)] = obj
        return found
    for value in values:
        _objects(value, found)
    return found


def tensors_of(obj: Any) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = []
    _flatten(obj, tensors)
    return tensors


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    tensors: list[torch.Tensor] = []
    spec = _flatten(obj, tensors)
    return _unflatten(spec, [fn(t) for t in tensors], _objects(obj, {}))


@dataclasses.dataclass
class _Entry:
    graph: Graph
    inputs: list[torch.Tensor]  # the static input buffers, in _flatten order
    outputs: Any  # the static outputs


class SpanGraphs:
    """Captures and replays the work of spans (see the module docstring).

    A signature (key, input shapes) runs eagerly at its first `capture_at - 1` sightings, is
    captured at the next and replayed after. Why wait: a capture costs about two runs of the
    work, and a shape met once or twice is not worth one (TAPE's keep of one denoising step is
    met by the step's two CFG forwards, then never again). At most `capacity` graphs are kept
    (the least recently used dropped first)."""

    def __init__(self, make_graph: Callable[[], Graph], capacity: int = 16, capture_at: int = 3) -> None:
        self.make_graph = make_graph
        self.capacity = capacity
        self.capture_at = capture_at
        self.entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.sightings: collections.Counter[Hashable] = collections.Counter()
        self.counts = {"eager": 0, "captured": 0, "replayed": 0}

    def run(self, key: Hashable, inputs: Any, fn: Callable[[Any], Any]) -> tuple[Any, str]:
        """fn(inputs), and how it ran: "eager", "captured" (then replayed) or "replayed".
        fn must compute only from its argument (and weights that stay in place), without
        host syncs."""
        tensors: list[torch.Tensor] = []
        spec = _flatten(inputs, tensors)
        signature = (key, spec, tuple((tuple(t.shape), t.dtype, t.device) for t in tensors))
        entry = self.entries.get(signature)
        self.sightings[signature] += 1
        if entry is None and self.sightings[signature] < self.capture_at:
            self.counts["eager"] += 1
            return fn(inputs), "eager"
        how = "replayed"
        if entry is None:
            static = [t.clone() for t in tensors]
            static_inputs = _unflatten(spec, static, _objects(inputs, {}))
            graph = self.make_graph()
            entry = self.entries[signature] = _Entry(graph, static, graph.capture(lambda: fn(static_inputs)))
            if len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
            how = "captured"
        else:
            self.entries.move_to_end(signature)
            for buffer, value in zip(entry.inputs, tensors):
                buffer.copy_(value)
        entry.graph.replay()
        self.counts[how] += 1
        return map_tensors(torch.clone, entry.outputs), how


def cuda_graph_factory() -> Callable[[], Graph]:
    """Makes CudaGraphs sharing one memory pool."""
    pool = torch.cuda.graph_pool_handle()
    return lambda: CudaGraph(pool)
