"""Saving and loading a quantized model as a self-describing Hugging Face-style directory.

    DIR/config.json          the model config with `quantization_config` = {"quant_method": "duquant", ...}
    DIR/model.safetensors    packed integer weights, scales, zero points, transform tensors, other weights
    DIR/tokenizer files      as written by the tokenizer's save_pretrained
    DIR/duquant_run.json     the run record (config, calibration, versions, device, timings, results)

The directory is written under a temporary name next to DIR and renamed at the end, so a
crash never leaves a half-written DIR. Loading fails loudly on missing or unexpected tensors.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from . import __version__
from .config import QuantConfig
from .methods.apply import install_attention_quantizer
from .modeling.adapters import adapter_for
from .modeling.attention import use_quantized_attention
from .modeling.qlinear import QuantLinear, share_sibling_inputs
from .transforms.online import OnlineTransform

QUANT_METHOD = "duquant"
WEIGHTS_NAME = "model.safetensors"
RUN_RECORD_NAME = "duquant_run.json"


class CheckpointError(RuntimeError):
    pass


def is_quantized_dir(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    return (data.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def module_layout(model: nn.Module) -> dict[str, dict]:
    """The structure of every QuantLinear, written into config.json so loading can rebuild it exactly."""
    layout = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        t = m.input_transform
        layout[name] = {
            "weight_quantized": m.weight_spec is not None,
            "rot1": None if t is None or t.rot1 is None else t.rot1.shape[0],
            "perm": t is not None and t.perm is not None,
            "rot2": None if t is None or t.rot2 is None else t.rot2.shape[0],
            "hadamard": t is not None and t.hadamard,
        }
    return layout


def _state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embeddings: stored once
    return state


def save_quantized(model: nn.Module, tokenizer, out_dir: str | os.PathLike, config: QuantConfig,
                   run_record: dict | None = None, overwrite: bool = False) -> Path:
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.config.quantization_config = {
            "quant_method": QUANT_METHOD,
            "duquant_version": __version__,
            "config": config.to_dict(),
            "layout": module_layout(model),
            "dtype": str(model.dtype).removeprefix("torch."),
        }
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(_state_dict_for_saving(model), str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt", "duquant_version": __version__})
        record = dict(run_record or {})
        (tmp / RUN_RECORD_NAME).write_text(json.dumps(record, indent=2, default=str))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        # The live model keeps working as before; its config should not claim a checkpoint.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return out


def _build_quant_linear(original: nn.Linear, layout: dict, config: QuantConfig, dtype: torch.dtype) -> QuantLinear:
    transform = None
    if layout["rot1"] or layout["perm"] or layout["rot2"] or layout["hadamard"]:
        n = original.in_features
        transform = OnlineTransform(
            n,
            rot1=None if layout["rot1"] is None else torch.empty(layout["rot1"], layout["rot1"]),
            perm=torch.empty(n, dtype=torch.int64) if layout["perm"] else None,
            rot2=None if layout["rot2"] is None else torch.empty(layout["rot2"], layout["rot2"]),
            hadamard=layout["hadamard"],
        )
    weight_spec = config.weight_spec() if layout["weight_quantized"] else None
    return QuantLinear(original.in_features, original.out_features, original.bias is not None,
                       weight_spec, config.act_spec(), transform, dtype=dtype)


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Rebuild a quantized model from `path`; returns (model, QuantConfig, run record)."""
    path = Path(path)
    if not is_quantized_dir(path):
        raise CheckpointError(f"{path} is not a duquant checkpoint (no duquant quantization_config in config.json)")
    hf_config = AutoConfig.from_pretrained(path)
    qinfo = hf_config.quantization_config
    del hf_config.quantization_config
    config = QuantConfig.from_dict(qinfo["config"])
    dtype = dtype or getattr(torch, qinfo.get("dtype", "float32"))
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    adapter = adapter_for(model)

    state = load_file(str(path / WEIGHTS_NAME))
    layout = qinfo["layout"]
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for name in adapter.linear_names():
            full = f"{adapter.layers}.{index}.{name}"
            if full not in layout:
                raise CheckpointError(f"checkpoint {path} has no layout for {full}")
            layer.set_submodule(name, _build_quant_linear(layer.get_submodule(name), layout[full], config, dtype))
        install_attention_quantizer(layer, adapter, config)
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if hf_config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(result.unexpected_keys)[:8]}"
        )
    if hf_config.tie_word_embeddings:
        model.tie_weights()
    share_sibling_inputs(model)
    use_quantized_attention(model)
    model.eval().to(device)
    record_path = path / RUN_RECORD_NAME
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    return model, config, record
