"""QuaRot (Ashkboos et al., 2024): rotate, then quantize with RTN or GPTQ.

Per model: untie the embeddings, fold the final norm into lm_head, rotate the embeddings and
lm_head by the residual rotation Q (see quarot_rotation.py). Then one decoder layer at a time:
fold its norms and rotate it (offline, float64), install the attention quantizer (Hadamard
on Q and K after RoPE, K/V quantized per (token, head)), and swap its linears for
QuantLinears; down_proj gets the online Hadamard of the whole intermediate dimension (its
input is the SwiGLU product, which no offline rotation reaches). With GPTQ the layer's
calibration inputs come from the already-quantized layers before it.

With 16-bit weights, activations and KV the result is the original model up to float
rounding (computational invariance); the rotations only make the outliers quantizable.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import QuantConfig
from ..modeling.adapters import DecoderAdapter, adapter_for, attention_shape
from ..modeling.attention import use_quantized_attention
from ..sequential import capture_layer0_inputs, check_finite, run_layer
from .gptq_layer import quantize_layer, uses_gptq
from .plan import GroupTransform
from .quarot_rotation import residual_rotation, rotate_embeddings_and_head, rotate_layer

log = logging.getLogger(__name__)


def quarot_plans(adapter: DecoderAdapter) -> dict[str, GroupTransform]:
    """No online transform, except a full Hadamard on the input of the MLP's down projection."""
    mlp_inner = lambda g: g.producer_kind == "linear" and g.producer.startswith(adapter.mlp + ".")  # noqa: E731
    return {group.name: GroupTransform(hadamard=mlp_inner(group)) for group in adapter.groups}


@torch.no_grad()
def quantize_quarot(model: nn.Module, config: QuantConfig, calibration: torch.Tensor | None,
                    device: str | torch.device | None, batch_size: int, offload: bool | None, progress: bool):
    from ..quantize import QuantizationReport, _decide_offload  # noqa: PLC0415 - quantize.py imports us lazily

    start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    adapter = adapter_for(model)
    shape = attention_shape(model.config)
    report = QuantizationReport(config)
    gptq = uses_gptq(config)
    if gptq and calibration is None:
        raise ValueError("QuaRot with GPTQ weights needs calibration data")

    t = time.perf_counter()
    rotation = residual_rotation(shape.hidden_size, config)
    rotate_embeddings_and_head(model, adapter, rotation, device)
    rotate_time = time.perf_counter() - t

    inputs = None
    if gptq:  # captured after the embedding is rotated: the stream the rotated layers read
        offload = _decide_offload(calibration, model, device) if offload is None else offload
        t = time.perf_counter()
        inputs = capture_layer0_inputs(model, adapter, calibration, device, batch_size, offload)
        report.stage_seconds["capture"] = time.perf_counter() - t

    use_quantized_attention(model)
    plans = quarot_plans(adapter)
    layers = adapter.decoder_layers(model)
    for index, layer in enumerate(tqdm(layers, desc=f"quantize {config.describe()}", disable=not progress)):
        home = next(layer.parameters()).device
        layer.to(device)
        t = time.perf_counter()
        rotate_layer(layer, adapter, shape, rotation, device)
        rotate_time += time.perf_counter() - t
        quantize_layer(layer, index, adapter, plans, config, shape, inputs, device)
        if inputs is not None:
            inputs = run_layer(layer, inputs, device)
            check_finite(inputs, index)
        layer.to(home)
    report.stage_seconds["rotate"] = rotate_time
    report.seconds = time.perf_counter() - start
    log.info("quantized with %s in %.1f s", config.describe(), report.seconds)
    return report
