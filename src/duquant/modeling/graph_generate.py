"""Greedy generation whose one-token steps replay a CUDA graph.

`model.generate` runs every decode step eagerly: for a W4A4 model on the real backend that
is hundreds of kernel launches per token, each with its Python host code, so a step costs
several times its GPU time (results/kernels/NOTES.md, session 9). Here the prompt is run once
into a transformers `StaticCache`; then one decode step (the model on one new token per
sequence, and the argmax of its logits) is recorded as a CUDA graph and replayed for every
further token. The cache's write position and the position tensor advance on the device, so
every replay is the next step. Without CUDA (or with `use_graph=False`) the same loop runs
eagerly, which is what the CPU tests check against `model.generate`.

A model that quantizes K/V decodes from a `StaticQuantizedKVCache`: the codes of
`QuantizedKVCache` in fixed buffers, so its tokens are `model.generate`'s with that cache.
Greedy decoding only (the `duquant generate` command decodes greedily).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..cuda_graphs import capture
from .static_cache import cache_write_counters, rewind_cache, static_cache_for

log = logging.getLogger(__name__)
_WARMUP = 3  # eager steps before capture (cuBLAS workspaces, Triton compilation, lazy init)


@dataclass
class GenerationResult:
    ids: torch.Tensor  # [batch, prompt + generated] token ids
    new_tokens: int  # steps taken (≤ max_new_tokens: all sequences may stop at EOS earlier)
    mode: str  # "cuda-graph" or "eager"
    decode_seconds: float  # wall time of the decode steps after the prompt (first token excluded)


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_ids: list[int] | tuple[int, ...] = (), use_graph: bool = True) -> GenerationResult:
    """Greedy continuation of `input_ids` [batch, prompt] (no padding: every row has the same
    length). Sequences that reach an EOS token keep emitting it while others go on, as
    `model.generate` pads them; the loop ends when all have stopped or after max_new_tokens."""
    prompt = input_ids.shape[1]
    device = input_ids.device
    cache = static_cache_for(model, prompt + max_new_tokens + 8)
    positions = torch.arange(prompt, device=device)
    logits = model(input_ids=input_ids, past_key_values=cache, position_ids=positions[None],
                   cache_position=positions, use_cache=True).logits
    token = logits[:, -1].argmax(-1)
    out = [token]
    eos = torch.tensor(list(eos_token_ids), device=device, dtype=token.dtype)
    finished = torch.isin(token, eos)

    position = torch.full((1,), prompt, device=device, dtype=torch.long)  # the step's position, advanced in place
    step_input = token[:, None].clone()

    def step() -> torch.Tensor:
        logits = model(input_ids=step_input, past_key_values=cache, position_ids=position[None],
                       cache_position=position, use_cache=True).logits
        return logits[:, -1].argmax(-1)

    run, mode = step, "eager"
    counters = cache_write_counters(cache)
    if use_graph and device.type == "cuda" and counters and max_new_tokens > 1:
        write_at = counters[0].clone()
        try:
            run, mode = _captured(step, counters, write_at), "cuda-graph"
        except Exception as e:  # noqa: BLE001 - generate anyway, eagerly, and say why
            rewind_cache(counters, write_at)  # a failed capture may have left warm-up writes counted
            mode = f"eager (CUDA graph capture failed: {type(e).__name__}: {str(e)[:160]})"
            log.warning("greedy_generate: %s", mode)
    start = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        if eos.numel() and bool(finished.all()):  # a host sync: only when there is an EOS to wait for
            break
        token = run()
        if eos.numel():
            token = torch.where(finished, eos[0], token)
            finished |= torch.isin(token, eos)
        out.append(token.clone())
        step_input.copy_(token[:, None])
        position.add_(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return GenerationResult(torch.cat([input_ids, torch.stack(out, dim=1)], dim=1), len(out), mode, seconds)


def _captured(step, counters: list[torch.Tensor], write_at: torch.Tensor):
    """`step` recorded as a CUDA graph. Each warm-up step writes the cache at the step's
    position and advances its write counters: the counters are rewound to `write_at` after
    each (the slot is rewritten by the first real step)."""
    graph, result = capture(step, _WARMUP, lambda: rewind_cache(counters, write_at))

    def replay() -> torch.Tensor:
        graph.replay()
        return result

    return replay
