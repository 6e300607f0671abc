"""Calibration token windows, with a hash that identifies them in the run record."""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .datasets import EVAL_DATASETS, DataUnavailableError, load_text


@dataclass(frozen=True)
class CalibrationSpec:
    source: str = "c4"  # a dataset name, "random", or a path to a text file
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def token_hash(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def sample_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens from a 1-D token stream."""
    if token_ids.numel() <= seqlen:
        raise DataUnavailableError(f"calibration text has {token_ids.numel()} tokens, fewer than seqlen={seqlen}")
    starts = torch.randint(0, token_ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([token_ids[s : s + seqlen] for s in starts.tolist()])


def calibration_tokens(tokenizer, spec: CalibrationSpec, vocab_size: int,
                       data_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """[nsamples, seqlen] int64 token ids drawn with `spec.seed`."""
    generator = torch.Generator().manual_seed(spec.seed)
    if spec.source == "random":
        # The DuQuant paper's calibration-free setting (Table E18): uniform random token ids.
        return torch.randint(0, vocab_size, (spec.nsamples, spec.seqlen), generator=generator)
    if spec.source in EVAL_DATASETS:
        text = load_text(spec.source, split="calib", data_dir=data_dir)
    else:
        path = Path(spec.source)
        if not path.is_file():
            raise DataUnavailableError(
                f"calibration source {spec.source!r} is neither a dataset ({', '.join(EVAL_DATASETS)}), "
                "'random', nor an existing text file"
            )
        text = path.read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return sample_windows(ids, spec.nsamples, spec.seqlen, generator)
