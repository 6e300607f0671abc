"""`quantize(model, config, calibration)`: the one verb of the library."""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .methods.fitting import fit_groups
from .methods.gptq_layer import quantize_layer, uses_gptq
from .methods.statistics import collect
from .modeling.adapters import adapter_for, attention_shape
from .modeling.attention import use_quantized_attention
from .modeling.calibration_kernels import calibration_kernels
from .modeling.real_linear import real_layers
from .sequential import capture_layer0_inputs, check_finite, run_layer

log = logging.getLogger(__name__)


@dataclass
class QuantizationReport:
    config: QuantConfig
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)


def layer_generator(seed: int, layer_index: int, group_index: int) -> torch.Generator:
    """A dedicated generator per (layer, group): same seed → same rotations, in any order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer_index * 101 + group_index)


def _needs(config: QuantConfig) -> tuple[bool, bool]:
    """(FP-model abs-max statistics, quantized-prefix mean statistics)."""
    wants_rotation = config.method == "duquant" and (config.rotations > 0 or config.permute)
    return config.uses_smoothing, wants_rotation


@torch.no_grad()
def quantize(model: nn.Module, config: QuantConfig, calibration: torch.Tensor | None = None,
             device: str | torch.device | None = None, batch_size: int = 1, offload: bool | None = None,
             progress: bool = True) -> QuantizationReport:
    """Quantize `model` (a transformers causal LM of a supported family) in place.

    calibration: [nsamples, seqlen] token ids; required by every method except RTN.
    device: where each decoder layer runs (default: CUDA if available). The model itself may
        stay on the CPU: one layer at a time is moved to `device` and back.
    offload: keep calibration activations on the CPU (default: only when `device` is not the CPU
        and they would take more than half of the free accelerator memory).
    """
    if config.method == "quarot":
        from .methods.quarot import quantize_quarot  # noqa: PLC0415 - keeps the import graph simple

        return quantize_quarot(model, config, calibration, device, batch_size, offload, progress)
    start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    adapter = adapter_for(model)
    shape = attention_shape(model.config)
    want_absmax, want_mean = _needs(config)
    # GPTQ reads each layer's inputs from the quantized prefix, the stream DuQuant's rotations use.
    want_prefix = want_mean or uses_gptq(config)
    report = QuantizationReport(config)

    needs_data = want_absmax or want_prefix
    if needs_data and calibration is None:
        raise ValueError(f"method {config.method} needs calibration data")
    fp_inputs = q_inputs = None
    if needs_data:
        offload = _decide_offload(calibration, model, device) if offload is None else offload
        t = time.perf_counter()
        captured = capture_layer0_inputs(model, adapter, calibration, device, batch_size, offload)
        fp_inputs = captured if want_absmax else None
        q_inputs = (captured.clone() if want_absmax else captured) if want_prefix else None
        report.stage_seconds["capture"] = time.perf_counter() - t

    use_quantized_attention(model)  # quantized layers must quantize Q/K/V while calibrating, too
    layers = adapter.decoder_layers(model)
    fit_time = 0.0
    with calibration_kernels(model, device):  # RMSNorm and RoPE of the FP passes on kernels (CUDA)
        for index, layer in enumerate(tqdm(layers, desc=f"quantize {config.describe()}", disable=not progress)):
            home = next(layer.parameters()).device
            layer.to(device)
            t = time.perf_counter()
            fp_stats = q_stats = None
            if want_absmax:
                fp_stats, fp_next = collect(layer, adapter, fp_inputs, device, want_absmax=True, want_mean=False)
            if want_mean:
                q_stats, _ = collect(layer, adapter, q_inputs, device, want_absmax=False, want_mean=True,
                                     want_outputs=False)  # only the statistics: stop before down_proj runs
            plans = fit_groups(
                adapter.groups, layer, config, shape,
                absmax=None if fp_stats is None else fp_stats.absmax,
                mean_sequence=None if q_stats is None else {g.name: q_stats.mean_sequence(g.name) for g in adapter.groups
                                                             if g.name in q_stats.mean_sum},
                generators=[layer_generator(config.seed, index, g) for g in range(len(adapter.groups))],
                where=f"layer {index}",
            )
            fit_time += time.perf_counter() - t
            quantize_layer(layer, index, adapter, plans, config, shape, q_inputs, device)
            if want_absmax:  # the full-precision stream feeds the next layer's smoothing statistics
                fp_inputs = fp_next
                check_finite(fp_inputs, index, "full-precision output")
            if want_prefix:  # the quantized prefix feeds the next layer's rotation statistics and GPTQ
                with real_layers(layer) if config.calib_forward == "real" else nullcontext():
                    q_inputs = run_layer(layer, q_inputs, device)
                check_finite(q_inputs, index)
            layer.to(home)
    report.stage_seconds["fit"] = fit_time
    report.seconds = time.perf_counter() - start
    log.info("quantized with %s in %.1f s", config.describe(), report.seconds)
    return report


def _decide_offload(calibration: torch.Tensor, model: nn.Module, device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    bytes_needed = calibration.numel() * model.config.hidden_size * 4 * 3  # fp + q streams, and outputs
    free, _ = torch.cuda.mem_get_info(device)
    return bytes_needed > free // 2
