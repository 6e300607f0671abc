"""Recording a callable as a CUDA graph, the one way the package does it.

A capture must not be the first run of its kernels: cuBLAS allocates workspaces, Triton
compiles and transformers initialises lazily on a first call, and none of that may happen
while the stream is being recorded. So `capture` first runs the callable a few times on a
side stream, then records one call.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def capture(fn: Callable[[], object], warmup: int, after_warmup_call: Callable[[], object] | None = None,
            device: torch.device | None = None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run fn() `warmup` times on a side stream (after_warmup_call() after each, e.g. to undo
    what a warm-up call advanced), then record one call of fn, which is not run. Returns the
    graph and what the recorded call returned (tensors that every replay rewrites)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
            if after_warmup_call is not None:
                after_warmup_call()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # recorded, not run
        result = fn()
    return graph, result
