"""Model families as data: where the decoder layers, norms and linear groups are.

Algorithm code never branches on a model name; it asks the adapter. A *linear group* is a
set of linears that read the same activation, plus the module that produces that
activation (where smoothing is folded in).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LinearGroup:
    name: str
    linears: tuple[str, ...]  # paths inside a decoder layer; all read the same activation
    producer: str  # path of the module whose output is that activation
    producer_kind: str  # "norm" (an RMSNorm scale) or "linear" (output rows of a linear)


@dataclass(frozen=True)
class DecoderAdapter:
    layers: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    rotary_emb: str = "model.rotary_emb"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attention: str = "self_attn"
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    # The linears that add into the residual stream, and the attention's V / output projections
    # (QuaRot rotates the residual stream and fuses a per-head Hadamard between the latter two).
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    groups: tuple[LinearGroup, ...] = (
        LinearGroup("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "norm"),
        LinearGroup("o", ("self_attn.o_proj",), "self_attn.v_proj", "linear"),
        LinearGroup("gate_up", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "norm"),
        LinearGroup("down", ("mlp.down_proj",), "mlp.up_proj", "linear"),
    )

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def linear_names(self) -> list[str]:
        return [name for group in self.groups for name in group.linears]


# LLaMA-style decoders: pre-norm, SwiGLU MLP, RoPE, GQA, optional q/k/v biases (Qwen2).
LLAMA_STYLE = DecoderAdapter()

ADAPTERS: dict[str, DecoderAdapter] = {
    "LlamaForCausalLM": LLAMA_STYLE,
    "MistralForCausalLM": LLAMA_STYLE,
    "Qwen2ForCausalLM": LLAMA_STYLE,
}


class UnsupportedModelError(ValueError):
    pass


def adapter_for(model: nn.Module) -> DecoderAdapter:
    name = type(model).__name__
    if name not in ADAPTERS:
        raise UnsupportedModelError(
            f"duquant does not support the architecture {name}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[name]


@dataclass(frozen=True)
class AttentionShape:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads


def attention_shape(config) -> AttentionShape:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return AttentionShape(config.hidden_size, heads, getattr(config, "num_key_value_heads", None) or heads, head_dim)
