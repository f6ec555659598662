"""Pruning inside diffusers' context parallelism, on two CPU processes (gloo).

Each test spawns two ranks (cp_worker.py) that run the same scenarios single-process and
under Ulysses or ring attention; the test compares what they saw. Tolerances: diffusers'
context-parallel attention reorders float sums, so outputs agree to ~1e-6, not bit for bit."""

from __future__ import annotations

import multiprocessing
import socket

import pytest
import torch

import cp_worker

TIMEOUT_S = 90
TOLERANCE = 1e-4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(mode: str, frames: int, tmp_path) -> list[dict]:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available on this platform")
    context = multiprocessing.get_context("spawn")
    port = free_port()
    ranks = [context.Process(target=cp_worker.worker, args=(rank, 2, port, mode, frames, str(tmp_path)))
             for rank in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(TIMEOUT_S)
    for process in ranks:
        if process.is_alive():
            process.kill()
    results = []
    for rank, process in enumerate(ranks):
        path = tmp_path / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} wrote nothing (exit code {process.exitcode})"
        result = torch.load(path, weights_only=False)
        assert "error" not in result, f"rank {rank} failed:\n{result['error']}"
        results.append(result)
    return results


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_common(results: list[dict]) -> None:
    for result in results:
        single, parallel = result["single"], result["parallel"]
        # diffusers' context parallelism alone: as the single process, within float reordering.
        assert max_difference(parallel["unpruned"]["output"], single["unpruned"]["output"]) < TOLERANCE
        # keep 1.0 under parallelism computes exactly what unpruned parallelism does.
        assert torch.equal(parallel["tape_1.0"]["output"], parallel["unpruned"]["output"])
        # remove after apply-then-enable_parallelism leaves plain parallelism.
        assert max_difference(result["removed_unpruned"], single["unpruned"]["output"]) < TOLERANCE
        assert "context parallelism" in result["refused"] and "tape" in result["refused"]
    # Every rank gathers the same full output.
    for name in results[0]["parallel"]:
        assert torch.equal(results[0]["parallel"][name]["output"], results[1]["parallel"][name]["output"]), name


def check_balanced(results: list[dict], name: str) -> None:
    """Both ranks computed the same number of tokens in every block, half of the span's total."""
    seen = [result["parallel"][name]["block_tokens"] for result in results]
    assert seen[0] == seen[1], (name, seen)
    spans = results[0]["parallel"][name]["spans"]
    assert spans, name
    for start, tokens, _ in spans:
        assert tokens % 2 == 0
        assert tokens // 2 in seen[0], (name, start, tokens, seen[0])


def check_lip(results: list[dict]) -> None:
    for result in results:
        single, parallel = result["single"], result["parallel"]
        balanced = result["balanced_mask"]
        assert balanced.view(2, -1).sum(dim=1).unique().numel() == 1  # equal kept counts per chunk
        # Parallel LIP is single-process LIP on the balanced mask (a superset of the given one).
        assert max_difference(parallel["lip"]["output"], single["lip_balanced"]["output"]) < TOLERANCE
        assert max_difference(result["applied_first_lip"], single["lip_balanced"]["output"]) < TOLERANCE
        lip_index = parallel["lip"]["spans"][0][2]
        assert torch.equal(lip_index[0], balanced.nonzero().squeeze(1))
    for name in ("lip", "lip_noar", "lip_clean"):
        check_balanced(results, name)
    # Without balancing the chunks would differ: the test's mask is uneven.
    keep = cp_worker.lip_mask(results[0]["parallel"]["lip"]["output"].shape[2]).flatten()
    assert keep.view(2, -1).sum(dim=1).unique().numel() == 2


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_no_frame_split_matches_single_process(mode, tmp_path):
    """4 frames over 2 ranks: no frame is split, so TAPE selects exactly as single-process."""
    results = spawn(mode, 4, tmp_path)
    check_common(results)
    for result in results:
        single, parallel = result["single"], result["parallel"]
        for name in ("tape_0.5", "tape_0.5_global"):
            if name == "tape_0.5":  # per frame: the same selection in every span
                for (_, _, a), (_, _, b) in zip(single[name]["spans"], parallel[name]["spans"]):
                    assert torch.equal(a, b)
                assert max_difference(parallel[name]["output"], single[name]["output"]) < TOLERANCE
            check_balanced(results, name)
            assert not torch.equal(parallel[name]["output"], parallel["unpruned"]["output"])
    check_lip(results)


def test_split_frame_differs_only_there(tmp_path):
    """3 frames over 2 ranks: frame 1 is split between them; its budget is split by position,
    so the selection may differ from single-process in frame 1 only, and stays balanced."""
    results = spawn("ulysses", 3, tmp_path)
    check_common(results)
    check_balanced(results, "tape_0.5")
    per_frame = 16
    for result in results:
        single, parallel = result["single"], result["parallel"]
        for (_, tokens_a, a), (_, tokens_b, b) in zip(single["tape_0.5"]["spans"], parallel["tape_0.5"]["spans"]):
            assert tokens_a == tokens_b
            for frame in (0, 2):
                in_frame = lambda index: index[(index // per_frame) == frame]  # noqa: E731
                assert torch.equal(in_frame(a[0]), in_frame(b[0]))
            # Frame 1 keeps as many as the others (the keep ratio follows the paper's schedule),
            # its budget split between the ranks' halves of it by position.
            frames = torch.bincount(b[0] // per_frame, minlength=3)
            assert frames[1] == frames[0] == frames[2]
            middle = b[0][(b[0] // per_frame) == 1] - per_frame
            assert abs(int((middle < 8).sum()) - int((middle >= 8).sum())) <= 1
    check_lip(results)


def test_pipeline_cache_and_refresh_under_ulysses(tmp_path):
    """TapeConfig's defaults (a token cache and the change and staleness terms, carried from
    step to step and held per rank for its chunk) in a WanPipeline call of 4 latent frames
    (none split over the 2 ranks): the same selection as single-process in every span of
    every forward, balanced kept counts, and the single-process output."""
    results = spawn("pipeline", 0, tmp_path)
    for result in results:
        single, parallel = result["single"], result["parallel"]
        assert len(single["spans"]) == len(parallel["spans"])
        pruned = 0
        for forward_single, forward_parallel in zip(single["spans"], parallel["spans"]):
            for (_, tokens_a, a), (_, tokens_b, b) in zip(forward_single, forward_parallel):
                assert tokens_a == tokens_b
                if a is not None:
                    pruned += 1
                    assert torch.equal(a, b)
                    assert tokens_b % 2 == 0 and tokens_b // 2 in parallel["block_tokens"]
        assert pruned > 0, "no span pruned"
        assert max_difference(parallel["output"], single["output"]) < TOLERANCE
    assert torch.equal(results[0]["parallel"]["output"], results[1]["parallel"]["output"])
    assert results[0]["parallel"]["block_tokens"] == results[1]["parallel"]["block_tokens"]
