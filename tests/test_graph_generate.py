"""Greedy generation through a StaticCache (`modeling.graph_generate`): on the CPU its eager
loop must give `model.generate`'s tokens; the CUDA-graph replay is checked against the eager
loop in tests/test_kernels_gpu.py."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from duquant.modeling.graph_generate import greedy_generate


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_generate_matches_transformers_generate(family: str) -> None:
    model = tiny_model(family)
    ids = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(0))
    want = model.generate(ids, max_new_tokens=9, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = greedy_generate(model, ids, 9)
    assert got.mode == "eager" and got.new_tokens == 9
    assert torch.equal(got.ids, want)


def test_greedy_generate_stops_at_eos_and_pads_finished_rows() -> None:
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    free = greedy_generate(model, ids, 6).ids[:, 5:]
    eos = int(free[0, 1])  # row 0 "ends" at its second token
    got = greedy_generate(model, ids, 6, eos_token_ids=[eos]).ids[:, 5:]
    assert torch.equal(got[0, :2], free[0, :2]) and bool((got[0, 2:] == eos).all())
    stop = int((free[1] == eos).nonzero()[0]) + 1 if bool((free[1] == eos).any()) else 6
    assert torch.equal(got[1, :stop], free[1, :stop])
    assert got.shape[1] <= 6
