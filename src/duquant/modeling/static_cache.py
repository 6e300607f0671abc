"""Static KV caches and their write position, for code that replays decode steps from a CUDA
graph (the benchmarks, `graph_generate`)."""
from __future__ import annotations

import torch
from torch import nn


def static_cache_for(model: nn.Module, max_cache_len: int):
    """transformers' StaticCache for `max_cache_len` tokens, or a StaticQuantizedKVCache (the
    same write-position mechanics, K/V stored as codes) for a model that quantizes K or V."""
    from transformers import StaticCache

    from .kv_cache import StaticQuantizedKVCache, has_quantized_kv

    if has_quantized_kv(model):
        return StaticQuantizedKVCache(model, max_cache_len=max_cache_len)
    return StaticCache(config=model.config, max_cache_len=max_cache_len)


def cache_write_counters(cache) -> list[torch.Tensor]:
    """The per-layer write positions of a transformers ≥ 5.17 StaticCache (`cumulative_length`).

    Every forward advances them by the number of new tokens, also on each CUDA-graph replay
    (the increment is a recorded kernel): replayed 1-token steps write at seq, seq + 1, ...
    Read them after the first forward: the lazy initialisation replaces them with device
    tensors. Older caches (without them) give an empty list."""
    counters = [getattr(layer, "cumulative_length", None) for layer in getattr(cache, "layers", [])]
    return [c for c in counters if isinstance(c, torch.Tensor)]


def rewind_cache(counters: list[torch.Tensor], position: torch.Tensor) -> None:
    """Set every layer's write position to `position` (a 0-d device tensor)."""
    if counters:
        torch._foreach_copy_(counters, [position] * len(counters))  # one kernel for all layers
