"""Sibling linears (q/k/v, gate/up) quantize their shared input once: `InputMemo` and
`share_sibling_inputs`, in the simulated forward used by calibration and evaluation."""
from __future__ import annotations

import gc

import pytest
import torch
from conftest import tiny_model

from duquant import QuantConfig, quantize
from duquant.checkpoint import load_quantized, save_quantized
from duquant.modeling.input_memo import InputMemo
from duquant.modeling.qlinear import QuantLinear
from duquant.transforms.online import OnlineTransform


def test_memo_hits_only_the_same_unchanged_tensor_under_the_same_key():
    memo, calls = InputMemo(), []
    x = torch.randn(4, 8)

    def compute(tag):
        calls.append(tag)
        return tag

    assert memo.lookup(x, "k", lambda: compute("a")) == "a"
    assert memo.lookup(x, "k", lambda: compute("b")) == "a"  # hit
    assert memo.lookup(x, "other", lambda: compute("c")) == "c"  # another key
    x.add_(1)  # in place: the version counter moves
    assert memo.lookup(x, "other", lambda: compute("d")) == "d"
    assert memo.lookup(x.clone(), "other", lambda: compute("e")) == "e"  # equal values, other object
    assert calls == ["a", "c", "d", "e"]


def test_memo_never_keeps_its_input_alive():
    memo = InputMemo()
    x = torch.randn(16)
    memo.lookup(x, "k", lambda: torch.zeros(1))
    del x
    gc.collect()
    assert memo._entry is None  # the value went with its input


def _quantized(tokens, method="duquant"):
    model = tiny_model("llama")
    config = QuantConfig(method=method, rotation_steps=8) if method != "rtn" else QuantConfig(method="rtn")
    quantize(model, config, tokens, device="cpu", batch_size=2, progress=False)
    return model, config


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("method", ["duquant", "quarot", "rtn"])
def test_siblings_quantize_their_input_once_and_logits_do_not_change(tokens, method, monkeypatch):
    model, _ = _quantized(tokens, method)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.input_share_key is attn.k_proj.input_share_key is attn.v_proj.input_share_key
    assert mlp.gate_proj.input_share_key is mlp.up_proj.input_share_key
    if method == "duquant":  # elsewhere o_proj may have the same transform as q/k/v: a harmless shared key
        assert attn.o_proj.input_share_key is not attn.q_proj.input_share_key
    calls = []
    original = QuantLinear.quantize_input
    monkeypatch.setattr(QuantLinear, "quantize_input", lambda self, x: calls.append(1) or original(self, x))
    shared = _logits(model, tokens[:1])
    assert len(calls) == 4 * model.config.num_hidden_layers
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.input_share_key = None
    assert torch.equal(_logits(model, tokens[:1]), shared)  # bitwise: the memo only skips repeats
    assert len(calls) == 4 * model.config.num_hidden_layers + 7 * model.config.num_hidden_layers


def test_loaded_checkpoint_shares_sibling_inputs(tmp_path, tokens):
    model, config = _quantized(tokens)
    save_quantized(model, None, tmp_path / "q", config)
    loaded, _, _ = load_quantized(tmp_path / "q")
    attn = loaded.model.layers[1].self_attn
    assert attn.q_proj.input_share_key is attn.k_proj.input_share_key is attn.v_proj.input_share_key
    assert attn.o_proj.input_share_key is not attn.q_proj.input_share_key
    assert torch.equal(_logits(loaded, tokens[:1]), _logits(model, tokens[:1]))


def test_different_transforms_do_not_share():
    from duquant.modeling.qlinear import share_sibling_inputs
    from duquant.quant.quantizer import QuantSpec

    parent = torch.nn.Module()
    rot = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))[0]
    for name, r in (("a", rot), ("b", rot.clone()), ("c", rot.T)):
        parent.add_module(name, QuantLinear(8, 8, False, QuantSpec(4), QuantSpec(4), OnlineTransform(8, rot1=r)))
    assert share_sibling_inputs(parent) == 1
    assert parent.a.input_share_key is parent.b.input_share_key is not parent.c.input_share_key
