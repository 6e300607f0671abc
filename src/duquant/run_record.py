"""The facts written next to every result: versions, device, timings."""
from __future__ import annotations

import platform
import sys
from importlib import metadata

import torch


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in ("duquant", "torch", "transformers", "safetensors", "triton", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def device_description(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
