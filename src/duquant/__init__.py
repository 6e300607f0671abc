"""duquant: W4A4 post-training quantization of LLaMA-family models (DuQuant, QuaRot, SmoothQuant, RTN)."""
__version__ = "0.1.0"

from .config import QuantConfig  # noqa: E402
from .quantize import quantize  # noqa: E402

__all__ = ["QuantConfig", "quantize", "__version__"]
