"""The `duquant` command line: quantize, eval, generate, bench."""
from __future__ import annotations

import argparse
import logging
import sys

from .config import PRESETS, preset_settings

log = logging.getLogger("duquant")


def _bits(text: str) -> int:
    value = int(text)
    if not (2 <= value <= 8 or value == 16):
        raise argparse.ArgumentTypeError(f"bits must be in 2..8 or 16, got {value}")
    return value


def _datasets(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 (default: float32 on CPU, float16 on CUDA)")
    p.add_argument("--data-dir", default=None, help="offline data folder (default: $DUQUANT_DATA_DIR)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["simulated", "real"], default="simulated",
                   help="simulated: fake-quant PyTorch (reference numerics); real: W4A4 linears on integer kernels "
                        "(Triton on CUDA, the pure-PyTorch reference of each kernel on CPU)")
    p.add_argument("--prefill-weight", choices=["none", "fp8", "int8"], default="none",
                   help="real backend: also keep an 8-bit copy of each weight for the prefill GEMM "
                        "(faster prefill, 3x the packed weight memory); none expands the 4-bit codes per call")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="real backend: fold the RMSNorms in front of q/k/v and gate/up, and SwiGLU's silu(gate)*up "
                        "in front of down_proj, into the transform kernels (their own kernels disappear), and run "
                        "each attention's rotary embedding as one kernel (default on: same perplexity, faster; "
                        "--no-fuse keeps them separate)")


def _add_eval_args(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument(flag, type=_datasets, default=[], help="comma-separated: wikitext2,c4,ptb")
    p.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window (default: --seqlen or 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--eval-batch-size", type=int, default=None, help="windows per forward (default: 4 on CUDA, 1 on CPU)")


# QuantConfig field -> `quantize` option dest, where the two names differ (for --preset).
_CONFIG_TO_DEST = {"w_symmetric": "w_sym", "a_symmetric": "a_sym", "kv_symmetric": "kv_sym", "kv_bits": "kvbits"}


def preset_defaults(preset: str) -> dict:
    """The `quantize` option defaults a --preset sets (explicit options still win)."""
    return {_CONFIG_TO_DEST.get(k, k): v for k, v in preset_settings(preset).items()}


def build_parser(quantize_defaults: dict | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duquant", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and optionally evaluate and save it")
    q.add_argument("model", help="hub id, local directory, .gguf file, or the alias smollm2-135m")
    q.add_argument("--method", choices=["rtn", "smoothquant", "duquant", "quarot"], default="duquant")
    q.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="evaluation setting: duquant = asymmetric W/A, Q quantized, K/V at --abits, automatic clips "
                        "(W 0.8, A/Q/K 0.9 at <=4 bits), RTN; quarot = symmetric W/A, Q in 16 bit, KV cache 4 bit asymmetric with "
                        "clip 0.95, A clip 0.9, W clip 1.0, GPTQ. Sets defaults only: explicit options override it")
    q.add_argument("--wbits", type=_bits, default=4)
    q.add_argument("--abits", type=_bits, default=4)
    q.add_argument("--qkv-bits", type=_bits, default=None, help="Q/K/V attention operands (default: --abits)")
    q.add_argument("--kvbits", type=_bits, default=None, help="K and V (KV cache) bits (default: --qkv-bits)")
    q.add_argument("--quantize-q", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize Q too (DuQuant setting, default); --no-quantize-q keeps Q in 16 bit (QuaRot setting)")
    q.add_argument("--w-sym", dest="w_sym", action="store_true", default=False, help="symmetric weights")
    q.add_argument("--w-asym", dest="w_sym", action="store_false", help="asymmetric weights (default)")
    q.add_argument("--a-sym", dest="a_sym", action="store_true", default=False, help="symmetric activations")
    q.add_argument("--a-asym", dest="a_sym", action="store_false", help="asymmetric activations (default)")
    q.add_argument("--kv-sym", dest="kv_sym", action="store_true", default=None,
                   help="symmetric Q/K/V (KV cache) quantizer (default: as the activations)")
    q.add_argument("--kv-asym", dest="kv_sym", action="store_false", help="asymmetric Q/K/V (KV cache) quantizer")
    q.add_argument("--w-clip", type=float, default=None, help="weight clip ratio (default: 0.8 at <=4 bits, else 1.0)")
    q.add_argument("--a-clip", type=float, default=None, help="activation clip ratio (default: 0.9 at <=4 bits, else 1.0)")
    q.add_argument("--qk-clip", type=float, default=None,
                   help="clip ratio of Q and K after their Hadamard (default: 0.9 at <=4 bits, else 1.0)")
    q.add_argument("--v-clip", type=float, default=1.0, help="clip ratio of V")
    q.add_argument("--w-group-size", type=int, default=0)
    q.add_argument("--weight-quantizer", choices=["rtn", "gptq"], default="rtn",
                   help="gptq: rounding with error feedback on the transformed weights (needs calibration)")
    q.add_argument("--gptq-damp", type=float, default=0.01, help="GPTQ damping, a fraction of mean(diag H)")
    q.add_argument("--gptq-act-order", action=argparse.BooleanOptionalAction, default=False,
                   help="GPTQ: quantize columns in order of decreasing Hessian diagonal")
    q.add_argument("--rotation", choices=["hadamard", "random"], default="hadamard",
                   help="QuaRot residual rotation: random Hadamard (default) or random orthogonal")
    q.add_argument("--alpha", type=float, default=None, help="smoothing strength (default 0.6 duquant, 0.5 smoothquant)")
    q.add_argument("--no-smooth", dest="smooth", action="store_false", help="DuQuant without smoothing (ablation)")
    q.add_argument("--rotations", type=int, choices=[0, 1, 2], default=2, help="DuQuant block rotations (ablation)")
    q.add_argument("--no-permute", dest="permute", action="store_false", help="DuQuant without zigzag (ablation)")
    q.add_argument("--block-size", type=int, default=None, help="rotation block (default 128, or the largest power of two dividing the layer)")
    q.add_argument("--rotation-steps", type=int, default=256)
    q.add_argument("--exchange", choices=["column", "row"], default="column", help="row: reference-code quirk")
    q.add_argument("--prefix-criterion", choices=["absmax", "range"], default="absmax", help="range: reference code")
    q.add_argument("--smooth-weight-stat", choices=["group", "first"], default="group", help="first: reference code")
    q.add_argument("--calib", default="c4", help="c4, wikitext2, ptb, random, or a text file")
    q.add_argument("--nsamples", type=int, default=128)
    q.add_argument("--seqlen", type=int, default=2048)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--calib-batch-size", type=int, default=8,
                   help="calibration sequences per layer forward (default 8, as the results tables were run: "
                        "fewer, larger forwards, which a small model needs to keep a GPU busy; the statistics "
                        "differ from batch 1 only by float rounding; lower it if the activations do not fit)")
    q.add_argument("--calib-forward", choices=["simulated", "real"], default="simulated",
                   help="how calibration runs each just-quantized layer to feed the next: simulated (fake "
                        "quantization, the reference protocol) or real (the W4A4 kernels the deployed model runs; "
                        "much faster on CUDA, results differ by kernel rounding)")
    q.add_argument("--out", default=None, help="directory to save the quantized model")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.add_argument("--eval-fp", action="store_true", help="also evaluate the full-precision model first")
    q.add_argument("--json", default=None, help="write the run record (with results) to this file")
    _add_eval_args(q, "--eval-ppl")
    _add_backend_args(q)
    _add_runtime_args(q)
    if quantize_defaults:
        q.set_defaults(**quantize_defaults)

    e = sub.add_parser("eval", help="perplexity of a model or a saved quantized directory")
    e.add_argument("model")
    _add_eval_args(e, "--ppl")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--json", default=None)
    _add_backend_args(e)
    _add_runtime_args(e)

    g = sub.add_parser("generate", help="generate text with a model or a saved quantized directory")
    g.add_argument("model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--no-cuda-graph", action="store_true",
                   help="decode with transformers' generate (eager steps) instead of replaying one CUDA graph "
                        "per token (the default on CUDA; a model with quantized K/V keeps its codes in a static cache)")
    _add_backend_args(g)
    _add_runtime_args(g)

    # Options of `bench` live in duquant.bench (it is also a module of its own); `main`
    # hands everything after the word "bench" to it.
    sub.add_parser("bench", help="W4A4 speed and memory against BF16 on a CUDA device (see duquant bench --help)",
                   add_help=False)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if getattr(args, "preset", None):  # parse again with the preset's values as defaults
        args = build_parser(preset_defaults(args.preset)).parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main  # noqa: PLC0415

        return bench_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from . import commands  # noqa: PLC0415 - heavy imports only after parsing

    handler = {"quantize": commands.quantize_command, "eval": commands.eval_command,
               "generate": commands.generate_command}[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        log.error("%s", err)
        if args.verbose:
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
