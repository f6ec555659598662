"""Bookkeeping shared by the training modes: resume, learning-rate schedule, stopping, loss curve,
progress prints and atomic checkpoints."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .common import Sizes

WARMUP_STEPS = 200
PRINT_SECONDS = 30.0


@dataclass
class Run:
    """Bookkeeping shared by the training modes: resume, learning-rate schedule, stopping,
    loss curve, progress prints and atomic checkpoints in `out`."""

    out: Path
    mode: str
    sizes: Sizes
    lr: float
    decay_minutes: float
    minutes: float | None
    steps: int | None
    save_minutes: float
    started: float  # time.monotonic() at the start of the command
    step: int = 0
    train_seconds: float = 0.0  # accumulated over all runs; drives the schedule
    runs: int = 0  # earlier runs in this folder
    curve: list = field(default_factory=list)  # [step, mean loss, train_seconds]
    _loss_sum: float = 0.0
    _loss_count: int = 0
    _bad_in_a_row: int = 0
    _last_tick: float = 0.0
    _last_save: float = 0.0
    _last_print: float = 0.0
    _print_step: int = 0

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint.pt"

    def resume(self) -> dict | None:
        """The saved state, or None for a fresh start; sets step, time, curve and run count."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.checkpoint.exists():
            return None
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        if state["mode"] != self.mode or state["sizes"] != self.sizes.name:
            raise ValueError(f"{self.checkpoint} is a {state['sizes']} {state['mode']} checkpoint, not "
                             f"{self.sizes.name} {self.mode}: use another --out folder")
        self.step, self.train_seconds = state["step"], state["train_seconds"]
        self.runs, self.curve = state["runs"] + 1, state["curve"]
        print(f"[{self.mode}] resuming from {self.checkpoint}: step {self.step}, "
              f"{self.train_seconds / 60:.1f} min trained before", flush=True)
        return state

    def lr_now(self) -> float:
        """Linear warm-up, then a cosine from lr to lr/10 over decay_minutes of training time."""
        warmup = min(1.0, (self.step + 1) / WARMUP_STEPS)
        progress = min(1.0, self.train_seconds / max(self.decay_minutes * 60, 1e-9))
        return self.lr * warmup * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    def done(self) -> bool:
        if self.steps is not None and self.step >= self.steps:
            return True
        return self.minutes is not None and time.monotonic() - self.started >= self.minutes * 60

    def begin(self) -> None:
        """Call right before the loop: starts the clocks."""
        now = time.monotonic()
        self._last_tick = self._last_save = self._last_print = now
        self._print_step = self.step

    def optimize(self, loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Backward, clip, and step unless the gradients are not finite. True if it stepped."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr_now()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        # One host sync per step, after all the step's work is queued: skips a bad batch instead of
        # letting a NaN ruin minutes of training.
        if not torch.isfinite(norm).item():
            self._bad_in_a_row += 1
            if self._bad_in_a_row >= 20:
                raise RuntimeError(f"[{self.mode}] 20 steps in a row had non-finite gradients at step {self.step}; "
                                   f"the last good checkpoint is {self.checkpoint}: resume with a lower --lr")
            print(f"[{self.mode}] step {self.step}: non-finite gradients, step skipped", flush=True)
            return False
        self._bad_in_a_row = 0
        optimizer.step()
        self._loss_sum += float(loss.detach())
        self._loss_count += 1
        self.step += 1
        return True

    def tick(self, save: Callable[[], None], samples_per_step: int) -> None:
        """After every step: time, loss curve, progress print and periodic save."""
        now = time.monotonic()
        self.train_seconds += now - self._last_tick
        self._last_tick = now
        if self._loss_count and self.step % self.sizes.log_every == 0:
            self.curve.append([self.step, self._loss_sum / self._loss_count, round(self.train_seconds, 1)])
            self._loss_sum, self._loss_count = 0.0, 0
        if now - self._last_print >= PRINT_SECONDS:
            rate = (self.step - self._print_step) / (now - self._last_print)
            loss = f"{self.curve[-1][1]:.4f}" if self.curve else f"(none before step {self.sizes.log_every})"
            print(f"[{self.mode}] step {self.step} loss {loss} lr {self.lr_now():.2e} {rate:.2f} it/s "
                  f"{rate * samples_per_step:.0f} clips/s {(now - self.started) / 60:.1f} min", flush=True)
            self._last_print, self._print_step = now, self.step
        if now - self._last_save >= self.save_minutes * 60:
            save()
            self._last_save = time.monotonic()

    def state(self) -> dict:
        return dict(mode=self.mode, sizes=self.sizes.name, step=self.step, train_seconds=self.train_seconds,
                    runs=self.runs, curve=self.curve)

    def save(self, tensors: dict, extra: dict | None = None) -> None:
        """Atomic checkpoint (a kill mid-save leaves the previous one) plus curve.json."""
        temporary = self.checkpoint.with_suffix(".tmp")
        torch.save({**self.state(), **tensors}, temporary)
        os.replace(temporary, self.checkpoint)
        curve = dict(mode=self.mode, sizes=self.sizes.name, step=self.step, train_seconds=self.train_seconds,
                     points=self.curve, **(extra or {}))
        (self.out / "curve.json").write_text(json.dumps(curve))
        print(f"[{self.mode}] saved {self.checkpoint} at step {self.step}", flush=True)


def make_run(args: argparse.Namespace, mode: str, sizes: Sizes) -> Run:
    minutes = args.minutes if args.minutes is not None or args.steps is not None else 8.0
    return Run(out=Path(args.out), mode=mode, sizes=sizes, lr=args.lr, decay_minutes=args.decay_minutes,
               minutes=minutes, steps=args.steps, save_minutes=args.save_minutes, started=args.started)
