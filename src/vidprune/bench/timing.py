"""Timing: every forward of a module (ForwardTimer), and repeated calls of a function (time_ms)."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


class ForwardTimer:
    """Milliseconds of every forward of the modules (in call order): CUDA events on a GPU,
    perf_counter on a CPU. torch hooks run outside diffusers' hook chain, so pruning and cache
    hooks are timed too."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.cuda = next(modules[0].parameters()).is_cuda
        self.marks: list[list[Any]] = []
        self.open: list[int] = []  # forwards begun and not ended (a forward may run another inside)
        self.handles = [handle for module in modules
                        for handle in (module.register_forward_pre_hook(self._start), module.register_forward_hook(self._end))]

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, module, args) -> None:
        self.open.append(len(self.marks))
        self.marks.append([self._mark()])

    def _end(self, module, args, output) -> None:
        self.marks[self.open.pop()].append(self._mark())

    def take(self) -> list[float]:
        """The forwards' times since the last take."""
        if self.cuda:
            torch.cuda.synchronize()
            times = [start.elapsed_time(end) for start, end in self.marks]
        else:
            times = [(end - start) * 1000 for start, end in self.marks]
        self.marks = []
        return times

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def time_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1, cuda: bool | None = None) -> list[float]:
    """Milliseconds of each of `repeats` calls of fn after `warmup` calls: CUDA events on a GPU
    (`cuda`: default, whether CUDA is available), perf_counter on a CPU."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1000)
    return times
