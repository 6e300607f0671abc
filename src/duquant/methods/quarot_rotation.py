"""QuaRot's offline rotation: computational invariance of a pre-norm decoder.

1. Fold each RMSNorm scale into the linears that read the norm (q/k/v, gate/up, lm_head) and
   set the scale to 1: RMSNorm without a scale commutes with any orthogonal Q,
   rmsnorm(x·Q) = rmsnorm(x)·Q.
2. Rotate the residual stream by one orthogonal Q (hidden × hidden, a random Hadamard or a
   random orthogonal matrix): the embedding table becomes E·Q, every reader of the stream
   W·Q (it receives x·Q, and x·Q·(W·Q)ᵀ = x·Wᵀ), every writer Qᵀ·W with bias b·Q (its output
   y becomes y·Q). Tied embeddings are untied first: the embedding becomes E·Q, lm_head W·Q.
3. Per attention head, fuse a Hadamard H (head_dim) between v_proj and o_proj: v_proj's rows
   of head h become Hᵀ·W_h (V·H), o_proj's columns of head h W_h·H. Softmax weights act on
   tokens, so the attention output per head is rotated by H too and o_proj undoes it.
All products are computed in float64 and cast back to the weight's dtype once.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import QuantConfig
from ..modeling.adapters import AttentionShape, DecoderAdapter
from ..transforms.hadamard import apply_hadamard, random_hadamard, random_orthogonal

_ROWS_PER_CHUNK = 8192  # bounds the float64 copy of a large embedding table


def residual_rotation(size: int, config: QuantConfig) -> torch.Tensor:
    """The seeded orthogonal Q of the residual stream (float64, CPU)."""
    generator = torch.Generator().manual_seed(config.seed)
    make = random_hadamard if config.rotation == "hadamard" else random_orthogonal
    return make(size, generator, torch.float64)


def _store(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(dtype=param.dtype, device=param.device))


def _right_multiply(weight: torch.Tensor, right: torch.Tensor, device: torch.device,
                    column_scale: torch.Tensor | None = None) -> None:
    """weight ← (weight·diag(column_scale))·right, in place, a chunk of rows at a time."""
    right = right.to(device)
    scale = None if column_scale is None else column_scale.detach().to(device, torch.float64)
    for start in range(0, weight.shape[0], _ROWS_PER_CHUNK):
        rows = weight.data[start : start + _ROWS_PER_CHUNK].to(device, torch.float64)
        if scale is not None:
            rows = rows * scale
        _store(weight.data[start : start + _ROWS_PER_CHUNK], rows @ right)


def _fold_norm_scale(norm: nn.Module) -> torch.Tensor:
    """The norm's scale (float64), after which the norm's own scale is set to 1."""
    scale = norm.weight.detach().double().clone()
    norm.weight.data.fill_(1.0)
    return scale


def untie_embeddings(model: nn.Module, adapter: DecoderAdapter) -> None:
    """Give lm_head its own weight: the embedding and lm_head are rotated differently."""
    embed, head = model.get_submodule(adapter.embed_tokens), model.get_submodule(adapter.lm_head)
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False  # so save/load keep both tensors


@torch.no_grad()
def rotate_embeddings_and_head(model: nn.Module, adapter: DecoderAdapter, rotation: torch.Tensor,
                               device: torch.device) -> None:
    """E ← E·Q; lm_head ← (W·diag(final norm))·Q, final norm scale ← 1."""
    untie_embeddings(model, adapter)
    _right_multiply(model.get_submodule(adapter.embed_tokens).weight, rotation, device)
    final_scale = _fold_norm_scale(model.get_submodule(adapter.final_norm))
    _right_multiply(model.get_submodule(adapter.lm_head).weight, rotation, device, final_scale)


def _per_head_hadamard_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Hᵀ·W_h for each head's block of rows: (W_hᵀ·H)ᵀ."""
    out_features, in_features = weight.shape
    blocks = weight.reshape(out_features // head_dim, head_dim, in_features).transpose(1, 2)
    return apply_hadamard(blocks).transpose(1, 2).reshape(out_features, in_features)


def _per_head_hadamard_columns(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """W_h·H for each head's block of columns."""
    out_features, in_features = weight.shape
    return apply_hadamard(weight.reshape(out_features, in_features // head_dim, head_dim)).reshape(weight.shape)


@torch.no_grad()
def rotate_layer(layer: nn.Module, adapter: DecoderAdapter, shape: AttentionShape, rotation: torch.Tensor,
                 device: torch.device) -> None:
    """Fold the layer's norms, rotate its residual readers and writers, fuse the V Hadamard."""
    q = rotation.to(device)
    names = adapter.linear_names()
    linears = {name: layer.get_submodule(name) for name in names}
    weights = {name: lin.weight.detach().to(device, torch.float64) for name, lin in linears.items()}
    biases = {name: None if lin.bias is None else lin.bias.detach().to(device, torch.float64)
              for name, lin in linears.items()}

    # V·H per head (v_proj rows, and its bias), undone in o_proj's input columns.
    weights[adapter.v_proj] = _per_head_hadamard_rows(weights[adapter.v_proj], shape.head_dim)
    if biases[adapter.v_proj] is not None:
        biases[adapter.v_proj] = apply_hadamard(biases[adapter.v_proj].reshape(-1, shape.head_dim)).reshape(-1)
    weights[adapter.o_proj] = _per_head_hadamard_columns(weights[adapter.o_proj], shape.head_dim)

    # Readers: the linears fed by a norm get the norm's scale and Q on their input side.
    for group in adapter.groups:
        if group.producer_kind != "norm":
            continue
        scale = _fold_norm_scale(layer.get_submodule(group.producer)).to(device)
        for name in group.linears:
            weights[name] = (weights[name] * scale) @ q
    # Writers: their output joins the rotated residual stream.
    for name in adapter.residual_writers:
        weights[name] = q.T @ weights[name]
        if biases[name] is not None:
            biases[name] = biases[name] @ q

    for name, lin in linears.items():
        _store(lin.weight, weights[name])
        if biases[name] is not None:
            _store(lin.bias, biases[name])


@torch.no_grad()
def rotate_model(model: nn.Module, adapter: DecoderAdapter, shape: AttentionShape, config: QuantConfig,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The whole offline rotation at once (quantize_quarot does it one layer at a time); returns Q."""
    device = torch.device(device)
    rotation = residual_rotation(shape.hidden_size, config)
    rotate_embeddings_and_head(model, adapter, rotation, device)
    for layer in adapter.decoder_layers(model):
        rotate_layer(layer, adapter, shape, rotation, device)
    return rotation
