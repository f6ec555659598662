"""Profile TAPE's selection (scoring, smoothing, top-k) at one span start of a full-size
Wan2.1-1.3B-shaped block (random weights, bf16, 480x832x81): where do its milliseconds go?

    python benchmarks/profile_selection.py
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from vidprune.adapters import adapter_for
from vidprune.bench import build_transformer
from vidprune.importance import attention_received, sample_queries
from vidprune.runtime import bind_arguments
from vidprune.selection import select_per_frame, smooth_over_time
from vidprune.tokens import TokenGrid


def main() -> None:
    device = "cuda"
    transformer = build_transformer("wan-1.3b", device)
    adapter = adapter_for(transformer)
    grid = TokenGrid(21, 30, 52)
    captured = {}
    handle = transformer.blocks[8].register_forward_pre_hook(
        lambda m, a, kw: captured.update(bind_arguments(type(m).forward, a, kw)), with_kwargs=True)
    with torch.no_grad():
        transformer(hidden_states=torch.randn(1, 16, 21, 60, 104, device=device, dtype=torch.bfloat16),
                    timestep=torch.tensor([500.0], device=device),
                    encoder_hidden_states=torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16))
    handle.remove()
    block = transformer.blocks[8]
    queries = sample_queries(grid, 512, 0, device)

    def parts():
        with torch.profiler.record_function("query_key"):
            q, k = adapter.query_key(block, captured, queries)
        with torch.profiler.record_function("attention_received"):
            scores = attention_received(q, k)
        with torch.profiler.record_function("smooth"):
            scores = smooth_over_time(scores, grid, 1.0, 2)
        with torch.profiler.record_function("topk"):
            return select_per_frame(scores, grid, 0.5)

    with torch.no_grad():
        for _ in range(3):
            parts()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                parts()
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
