"""Perplexity under the GPTQ protocol.

The whole test text is tokenized once, split into non-overlapping windows of `seqlen`
tokens (the tail is dropped), and ppl = exp(mean negative log-likelihood over every
predicted token). Windows are evaluated in batches; every window is independent.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    dataset: str
    ppl: float
    windows: int
    tokens: int  # predicted tokens (seqlen − 1 per window)
    seqlen: int

    def to_dict(self) -> dict:
        return asdict(self)


def split_windows(token_ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    ids = token_ids.reshape(-1)
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: count * seqlen].reshape(count, seqlen)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, device: str | torch.device, batch_size: int = 1,
               progress: bool = True, desc: str = "perplexity") -> torch.Tensor:
    """Summed NLL (float64) of each window's predicted tokens, shape [windows]."""
    totals = []
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        )
        totals.append(loss.view(batch.shape[0], -1).double().sum(dim=1).cpu())
    return torch.cat(totals)


def perplexity(model, token_ids: torch.Tensor, seqlen: int = 2048, device: str | torch.device = "cpu",
               batch_size: int = 1, max_windows: int | None = None, dataset: str = "", progress: bool = True
               ) -> PerplexityResult:
    windows = split_windows(token_ids, seqlen, max_windows)
    nll = window_nll(model, windows, device, batch_size, progress, desc=f"ppl {dataset}".strip())
    tokens = windows.shape[0] * (seqlen - 1)
    ppl = math.exp(float(nll.sum()) / tokens)
    return PerplexityResult(dataset=dataset, ppl=ppl, windows=windows.shape[0], tokens=tokens, seqlen=seqlen)
