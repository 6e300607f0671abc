"""Decoder-layer and end-to-end benchmarks: a LLaMA-2-7B-shaped model with random weights,
BF16 against W4A4 (every decoder linear a `RealQuantLinear` with DuQuant's online transform
on its input and random packed 4-bit codes), measured in the same run. Attention runs in
BF16 in both (the README's "W4A4" setting: Q, K, V in 16 bit; "+KV4" would add their
quantization, which this benchmark does not time).

Variants: "bf16"; "w4a4" (packed 4-bit codes only; the prefill GEMM expands them to an
8-bit carrier per call); "w4a4_fp8w" (also an FP8 copy of q − z for the prefill GEMM:
faster prefill, more memory); "..._fused": the same with the RMSNorms in front of q/k/v
and gate/up, and SwiGLU's silu(gate)·up, fused into the transform kernels
(`modeling.fusion`; the BF16 variant keeps transformers' modules) and, as `to_real_backend`
does by default, q/k/v and gate/up each run as one GEMV launch at decode
(`modeling.joined_decode`); "w4a4_fused_unjoined" leaves that out (one GEMV per linear).
The _fused variants also run each attention's rotary embedding as one kernel
(`modeling.fused_rope`, as `to_real_backend` does); "w4a4_fused_stock_rope" keeps
transformers' five ops per tensor, and "bf16_rope" is BF16 with the same one-kernel RoPE:
that one is not a W4A4 gain, so the tables give the ratio against both BF16 variants.

Prefill: batch × seq tokens, median of CUDA-event-timed forwards after warm-up.
Decode: one new token per sequence against a static KV cache holding seq tokens, captured
in a CUDA graph and timed over many replays (eager timing, labelled, if capture fails or
on the CPU). Peak memory: `torch.cuda.max_memory_allocated` during each measurement.
Kernel breakdown (layer level, CUDA): one profiled prefill at batch 1 and ten eager decode steps
at batch 1 per variant, GPU time and kernel launches by stage (`duquant.bench.breakdown`).
level "layer": a 1-layer model (embedding and LM head not run: inputs_embeds in, the final
norm's output out); level "e2e": the whole model with its embedding and LM head.

Every function takes the device and the config, so the whole path also runs on the CPU
with a tiny LlamaConfig (tests/test_bench.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from ..cuda_graphs import capture
from ..kernels import ops
from ..modeling.static_cache import cache_write_counters, rewind_cache, static_cache_for
from .breakdown import breakdown_markdown, profile_breakdown
from .output import write_results
from .timing import (allocated_bytes, environment, environment_line, median_ms, peak_memory_bytes,
                     reset_peak_memory, synchronize)

SEQ = 2048
PREFILL_CHUNK = 512  # the decode cache is filled in chunks, to bound activation memory at large batch
VARIANTS = {"bf16": None, "bf16_rope": {"bf16": True},
            "w4a4": {"prefill_weight": None}, "w4a4_fp8w": {"prefill_weight": "fp8"},
            "w4a4_fused": {"prefill_weight": None, "fuse": True, "join": True},
            "w4a4_fp8w_fused": {"prefill_weight": "fp8", "fuse": True, "join": True},
            "w4a4_fused_unjoined": {"prefill_weight": None, "fuse": True},
            "w4a4_fused_stock_rope": {"prefill_weight": None, "fuse": True, "join": True, "rope": False},
            "w4a4_fused_pdl": {"prefill_weight": None, "fuse": True, "join": True, "pdl": True},
            "w4a4_fused_qkv4": {"prefill_weight": None, "fuse": True, "join": True, "qkv4": True}}
DEFAULT_VARIANTS = {"layer": ["bf16", "w4a4", "w4a4_fp8w", "w4a4_fp8w_fused"],
                    "e2e": ["bf16", "bf16_rope", "w4a4", "w4a4_fused"]}


# --- models ----------------------------------------------------------------------------

def llama2_7b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096)


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Build parameters directly in `dtype` (a float32 model of 7B parameters would need 27 GB)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_llama(config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """LlamaForCausalLM with transformers' random initialisation, built on `device` in `dtype`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(config).eval()
    model.config.use_cache = True
    return model


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q.float()


# Linears that read the same activation share one online transform, as in a DuQuant model.
_TRANSFORM_GROUP = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o",
                    "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down"}


def _random_quant_linear(lin: nn.Linear, transform, device: torch.device, gen: torch.Generator) -> nn.Module:
    """A QuantLinear of lin's shape with random 4-bit codes (zero point 8) and small scales."""
    from duquant.modeling.qlinear import QuantLinear
    from duquant.quant.quantizer import QuantSpec

    k, n = lin.in_features, lin.out_features
    with torch.device(device):
        q = QuantLinear(k, n, lin.bias is not None, QuantSpec(bits=4, clip=1.0), QuantSpec(bits=4, clip=0.9),
                        transform, lin.weight.dtype)
    q.qweight.copy_(torch.randint(0, 256, q.qweight.shape, dtype=torch.uint8, device=device, generator=gen))
    q.w_scale.copy_(torch.rand(n, 1, device=device, generator=gen) * 1e-3 + 1e-3)
    q.w_zero.fill_(8.0)
    return q


def make_w4a4(model: nn.Module, seed: int = 0, prefill_weight: str | None = None, fuse: bool = False,
              join: bool = False, rope: bool | None = None, qkv4: bool = False) -> int:
    """Replace every nn.Linear inside the decoder layers by a RealQuantLinear with random
    4-bit codes and a DuQuant transform (R1 · P · R2, 128-blocks; q/k/v share one, gate/up
    another), one linear at a time, so each BF16 weight is freed as soon as it is
    replaced; fuse: then fuse the norms and SwiGLU into the transforms and (unless rope is
    False) RoPE into one kernel; join: run q/k/v and gate/up as one GEMV each at decode.
    Returns the linear weight bytes."""
    from duquant.modeling.fused_rope import fuse_rotary
    from duquant.modeling.fusion import fuse_norms, fuse_swiglu
    from duquant.modeling.joined_decode import join_sibling_decodes
    from duquant.modeling.real_linear import RealQuantLinear, share_sibling_transforms
    from duquant.transforms.online import OnlineTransform

    device = next(model.parameters()).device
    gen_cpu = torch.Generator().manual_seed(seed)  # rotations and permutations (small)
    gen_dev = torch.Generator(device=device).manual_seed(seed)  # codes and scales, made where they live
    for layer in model.model.layers:
        transforms: dict[str, OnlineTransform] = {}
        for parent in (layer.self_attn, layer.mlp):
            names = [name for name, child in parent.named_children() if isinstance(child, nn.Linear)]
            for name in names:
                lin = getattr(parent, name)
                group = _TRANSFORM_GROUP[name]
                if group not in transforms:
                    k = lin.in_features
                    blk = 128 if k % 128 == 0 else 64
                    rot1, perm = _orthogonal(blk, gen_cpu), torch.randperm(k, generator=gen_cpu)
                    transforms[group] = OnlineTransform(k, rot1, perm, _orthogonal(blk, gen_cpu)).to(device)
                q = _random_quant_linear(lin, transforms[group], device, gen_dev)
                real = RealQuantLinear(q, prefill_weight)
                real.packed_weight()  # builds the 8-bit prefill copy now (CUDA only), so it counts as resident
                setattr(parent, name, real)
                del lin, q
    share_sibling_transforms(model)
    if fuse:
        fuse_norms(model)
        fuse_swiglu(model)
    if fuse if rope is None else rope:
        fuse_rotary(model)
    if join:
        join_sibling_decodes(model)
    if qkv4:
        _quantize_attention_operands(model)
    return linear_weight_bytes(model)


def _quantize_attention_operands(model: nn.Module) -> None:
    """Q/K/V per (token, head) at DuQuant's default bits and clips, after a head_dim Hadamard on Q/K."""
    from duquant.config import QuantConfig
    from duquant.methods.apply import install_attention_quantizer
    from duquant.modeling.adapters import adapter_for
    from duquant.modeling.attention import use_quantized_attention

    adapter, config = adapter_for(model), QuantConfig(method="duquant")
    for layer in adapter.decoder_layers(model):
        install_attention_quantizer(layer, adapter, config)
    use_quantized_attention(model)


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the decoder linears' weights: BF16 weight, or packed codes + scales + zeros
    (+ the 8-bit prefill copy where one is kept)."""
    from duquant.modeling.real_linear import RealQuantLinear

    total = 0
    for layer in model.model.layers:
        for m in layer.modules():
            if isinstance(m, RealQuantLinear):
                total += sum(_tensor_bytes(t) for t in (m.qweight, m.w_scale, m.w_zero, getattr(m, "_w8", None)))
            elif isinstance(m, nn.Linear):
                total += _tensor_bytes(m.weight)
    return total


def build_variant(config, variant: str, device: torch.device, seed: int = 0) -> nn.Module:
    """BF16 random model; for the W4A4 variants its decoder linears are then replaced
    ("bf16_rope": only its rotary embeddings become one kernel each)."""
    from duquant.modeling.fused_rope import fuse_rotary

    model = random_llama(config, device, torch.bfloat16, seed)
    spec = {k: v for k, v in (VARIANTS[variant] or {}).items() if k != "pdl"}
    if spec.pop("bf16", False):
        fuse_rotary(model)
    elif spec:
        make_w4a4(model, seed, **spec)
    reset_peak_memory(device)  # return the freed BF16 weights to the device before measuring
    return model


def _release(device: torch.device) -> None:
    """Drop what a measurement left behind before the next one: the one-entry memo of the
    last quantized input (its codes stay alive while a graph or a caller holds the input,
    and would count in the next peak) and cached allocator blocks; restart the peak counter."""
    from duquant.modeling import qlinear, real_linear

    real_linear._MEMO.clear()
    qlinear._MEMO.clear()
    reset_peak_memory(device)


# --- prefill ---------------------------------------------------------------------------

def prefill_fn(model: nn.Module, batch: int, seq: int, e2e: bool, device: torch.device) -> Callable[[], object]:
    """One forward over batch × seq tokens, no KV cache (e2e: token ids in, last-token logits out)."""
    gen = torch.Generator(device=device).manual_seed(batch)
    if e2e:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device, generator=gen)
        return lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)
    h = torch.randn(batch, seq, model.config.hidden_size, device=device, generator=gen, dtype=torch.bfloat16)
    return lambda: model.model(inputs_embeds=h, use_cache=False)


def measure_prefill(model: nn.Module, batch: int, seq: int, e2e: bool, device: torch.device, reps: int = 10,
                    warmup: int = 3, graph: bool = False) -> dict[str, object]:
    """ms of one prefill forward (median of `reps` after `warmup`). graph: the same forward
    recorded once in a CUDA graph and timed over replays, the GPU time without the host's
    launch overhead (what a server that captures its prefill shapes sees; eager prefill at
    batch 1 is host-bound on the H100 machine). CUDA only."""
    fn = prefill_fn(model, batch, seq, e2e, device)
    _release(device)
    with torch.no_grad():
        ms = median_ms(capture_graph(fn) if graph else fn, device, reps, warmup)
    return {"ms": ms, "tokens_per_s": batch * seq / ms * 1e3, "peak_bytes": peak_memory_bytes(device),
            "reps": reps, "warmup": warmup, **({"mode": "cuda-graph"} if graph else {})}


# --- decode ----------------------------------------------------------------------------

def _positions(start: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + length, device=device)


def decode_inputs(model: nn.Module, batch: int, seq: int, e2e: bool,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs of a decode measurement: the prefix that fills the cache (hidden states
    [batch, seq, hidden]) and the new token (ids [batch, 1] for e2e, else hidden states)."""
    cfg = model.config
    gen = torch.Generator(device=device).manual_seed(seq + batch)
    prefix = torch.randn(batch, seq, cfg.hidden_size, device=device, generator=gen, dtype=torch.bfloat16)
    if e2e:
        return prefix, torch.randint(0, cfg.vocab_size, (batch, 1), device=device, generator=gen)
    return prefix, torch.randn(batch, 1, cfg.hidden_size, device=device, generator=gen, dtype=torch.bfloat16)


def fill_static_cache(model: nn.Module, prefix: torch.Tensor, chunk: int = PREFILL_CHUNK):
    """A StaticCache (StaticQuantizedKVCache for a model with quantized K/V) holding the
    prefix [batch, seq, hidden] (fed in chunks of `chunk` tokens), with room for one more token.

    transformers 5.x allocates the cache at its first update (so its batch size is the
    prefix's) and attends over all max_cache_len slots with a mask; the next token is
    written at slot seq, which must be < max_cache_len.
    """
    seq = prefix.shape[1]
    cache = static_cache_for(model, seq + 8)  # a slot for the step, padded to 8
    with torch.no_grad():
        for c0 in range(0, seq, chunk):
            pos = _positions(c0, min(chunk, seq - c0), prefix.device)
            # transformers 5.0 writes the cache at cache_position; 5.17 and 5.23 ignore it (the
            # cache keeps its own write position) and read positions from position_ids.
            model.model(inputs_embeds=prefix[:, c0:c0 + pos.numel()], past_key_values=cache, position_ids=pos[None],
                        cache_position=pos, use_cache=True)
    return cache


def decode_step_fn(model: nn.Module, cache, new: torch.Tensor, seq: int, e2e: bool) -> Callable[[], object]:
    """One decode step of the token(s) `new` at position `seq`. Each call first rewinds the
    cache's write position to `seq`: any number of calls (or graph replays) write the same
    slot and see the same seq cached tokens, so every step is the same step."""
    counters = cache_write_counters(cache)
    position = torch.full((), seq, dtype=counters[0].dtype if counters else torch.long, device=new.device)
    pos = _positions(seq, 1, new.device)
    inputs = {"input_ids": new} if e2e else {"inputs_embeds": new}
    forward = model if e2e else model.model

    def step():
        rewind_cache(counters, position)
        return forward(**inputs, past_key_values=cache, position_ids=pos[None], cache_position=pos, use_cache=True)

    return step


def capture_graph(step: Callable[[], object], warmup: int = 3) -> Callable[[], object]:
    """Record `step` in a CUDA graph (after warm-up on a side stream); returns its replay."""
    graph, _ = capture(step, warmup)
    return graph.replay


def measure_decode(model: nn.Module, batch: int, seq: int, e2e: bool, device: torch.device, steps: int = 20,
                   reps: int = 5) -> dict[str, object]:
    """ms per decode step (median of `reps` timings of `steps` back-to-back steps)."""
    prefix, new = decode_inputs(model, batch, seq, e2e, device)
    cache = fill_static_cache(model, prefix)
    del prefix
    step = decode_step_fn(model, cache, new, seq, e2e)
    _release(device)  # the cache fill is a prefill: its peak is not decode memory
    mode, run = "eager (no CUDA)", step
    with torch.no_grad():
        if device.type == "cuda":
            try:
                run, mode = capture_graph(step), "cuda-graph"
            except Exception as e:  # noqa: BLE001 - record why and time eagerly
                mode = f"eager (graph capture failed: {type(e).__name__}: {str(e)[:120]})"
                print(f"decode b={batch}: {mode}", flush=True)
        ms = median_ms(lambda: [run() for _ in range(steps)], device, reps, warmup=1) / steps
    return {"ms": ms, "tokens_per_s": batch / ms * 1e3, "peak_bytes": peak_memory_bytes(device), "mode": mode,
            "steps": steps, "reps": reps, "cache_tokens": seq}


def profile_prefill(model: nn.Module, seq: int, e2e: bool, device: torch.device) -> dict[str, object]:
    """GPU kernel time by stage of one batch-1 prefill (after one warm-up forward)."""
    fn = prefill_fn(model, 1, seq, e2e, device)
    with torch.no_grad():
        fn()  # compiles the Triton kernels for this shape if the batch-1 timing did not run
        return profile_breakdown(fn, device)


def profile_decode(model: nn.Module, seq: int, e2e: bool, device: torch.device, steps: int = 10) -> dict[str, object]:
    """GPU kernel time by stage and kernel launches of one batch-1 decode step (mean of `steps`
    eager steps after warm-up: the kernels' own times, without the gaps a CUDA graph still has)."""
    prefix, new = decode_inputs(model, 1, seq, e2e, device)
    cache = fill_static_cache(model, prefix)
    del prefix
    step = decode_step_fn(model, cache, new, seq, e2e)
    with torch.no_grad():
        for _ in range(3):
            step()
        return profile_breakdown(lambda: [step() for _ in range(steps)], device, per=steps)


# --- the benchmark ---------------------------------------------------------------------

def _attempt(what: str, errors: list[str], fn: Callable[[], dict], device: torch.device) -> dict | None:
    """Run one measurement; a failure (OOM at a large batch, say) is recorded, not fatal."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        msg = f"{what} failed: {type(e).__name__}: {str(e)[:300]}"
        print(msg, flush=True)
        errors.append(msg)
        return None
    finally:
        _release(device)


def bench_variant(config, variant: str, level: str, batches: list[int], decode_batches: list[int],
                  device: torch.device, seq: int, reps: int, decode_steps: int, profile: bool,
                  errors: list[str], graph_prefill: bool = True) -> dict[str, object]:
    """Build `variant` and measure it; a variant with "pdl": True launches its decode GEMVs
    with programmatic dependent launch (`kernels/dependent_launch.py`, off by default)."""
    from duquant.kernels import dependent_launch

    pdl = (VARIANTS[variant] or {}).get("pdl", dependent_launch.DECODE_PDL)
    with dependent_launch.decode_pdl(pdl):
        return _measure_variant(config, variant, level, batches, decode_batches, device, seq, reps, decode_steps,
                                profile, errors, graph_prefill)


def _measure_variant(config, variant: str, level: str, batches: list[int], decode_batches: list[int],
                     device: torch.device, seq: int, reps: int, decode_steps: int, profile: bool,
                     errors: list[str], graph_prefill: bool) -> dict[str, object]:
    e2e = level == "e2e"
    model = build_variant(config, variant, device)
    synchronize(device)
    r: dict[str, object] = {"linear_weight_bytes": linear_weight_bytes(model), "model_bytes": allocated_bytes(device),
                            "prefill": {}, "decode": {}}
    for b in batches:
        b_reps = max(3, reps // 2) if b >= 16 else reps  # large batches take long enough to need fewer
        m = _attempt(f"{variant} prefill b={b}", errors,
                     lambda b=b, n=b_reps: measure_prefill(model, b, seq, e2e, device, reps=n), device)
        if m is not None:
            r["prefill"][str(b)] = m
            print(f"{variant} prefill b={b}: {m['ms']:.3f} ms, peak {_gib(m['peak_bytes'])} GiB", flush=True)
        if graph_prefill and device.type == "cuda":
            g = _attempt(f"{variant} prefill (CUDA graph) b={b}", errors,
                         lambda b=b, n=b_reps: measure_prefill(model, b, seq, e2e, device, reps=n, graph=True), device)
            if g is not None:
                r.setdefault("prefill_graph", {})[str(b)] = g
                print(f"{variant} prefill b={b} (CUDA graph): {g['ms']:.3f} ms", flush=True)
    if profile and device.type == "cuda" and not e2e:  # a 32-layer prefill trace is too long to keep
        r["breakdown_prefill_b1"] = _attempt(f"{variant} profile", errors,
                                             lambda: profile_prefill(model, seq, e2e, device), device)
    if profile and device.type == "cuda" and decode_batches:
        r["breakdown_decode_b1"] = _attempt(f"{variant} decode profile", errors,
                                            lambda: profile_decode(model, seq, e2e, device), device)
    for b in decode_batches:
        m = _attempt(f"{variant} decode b={b}", errors,
                     lambda b=b: measure_decode(model, b, seq, e2e, device, steps=decode_steps), device)
        if m is not None:
            r["decode"][str(b)] = m
            print(f"{variant} decode b={b}: {m['ms']:.3f} ms/step ({m['tokens_per_s']:.0f} tok/s, {m['mode']}), "
                  f"peak {_gib(m['peak_bytes'])} GiB", flush=True)
    del model
    ops.release_scratch()  # the next variant starts without this one's kernel scratch
    _release(device)
    return r


def run_layer_bench(level: str, batches: list[int] | None = None, decode_batches: list[int] | None = None,
                    layers: int | None = None, out_json: str | None = None, out_md: str | None = None, *,
                    variants: list[str] | None = None, device: str | torch.device = "cuda", config=None,
                    seq: int = SEQ, reps: int = 10, decode_steps: int = 20, profile: bool = True,
                    graph_prefill: bool = True) -> dict:
    """Benchmark `level` ("layer" or "e2e"); prints and writes the markdown table and JSON.

    config: a LlamaConfig (default: LLaMA-2-7B shapes with `layers` layers: 1 for "layer",
    32 for "e2e"); batches: prefill batch sizes ([]: no prefill); decode_batches: values ≤ 0
    are dropped ("--decode-batches 0": no decode);
    graph_prefill: on CUDA, also time each prefill as a CUDA-graph replay (phase "prefill_graph").
    profile: on CUDA, the kernel-time breakdown of a batch-1 decode step (and, for "layer", of a
    batch-1 prefill).
    """
    if level not in DEFAULT_VARIANTS:
        raise ValueError(f"level must be 'layer' or 'e2e', got {level!r}")
    device = torch.device(device)
    e2e = level == "e2e"
    config = config or llama2_7b_config(layers or (32 if e2e else 1))
    batches = batches if batches is not None else ([1, 4] if e2e else [1, 4, 16])  # []: no prefill
    decode_batches = [b for b in (decode_batches or ([1, 16] if e2e else [1, 4, 16, 64])) if b > 0]
    variants = variants or DEFAULT_VARIANTS[level]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    meta = {**environment(device), "level": level, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "intermediate": config.intermediate_size, "seq": seq, "prefill_warmup": 3, "decode_steps": decode_steps,
            "variants": variants}
    results: dict[str, dict] = {}
    errors: list[str] = []
    for variant in variants:
        results[variant] = bench_variant(config, variant, level, batches, decode_batches, device, seq, reps,
                                         decode_steps, profile, errors, graph_prefill)
        # partial results survive a timeout
        write_results({"meta": meta, "results": results, "errors": errors, "partial": True}, "", out_json, None)
    md = markdown(meta, results, errors)
    print(md)
    payload = {"meta": meta, "results": results, "errors": errors}
    write_results(payload, md, out_json, out_md)
    return payload


# --- report ----------------------------------------------------------------------------

def shape_label(hidden: int, intermediate: int) -> str:
    base = f"hidden {hidden}, MLP {intermediate}"
    return f"LLaMA-2-7B shapes ({base})" if (hidden, intermediate) == (4096, 11008) else f"tiny shapes ({base})"


def _gib(nbytes: int | None) -> str:
    return "—" if nbytes is None else f"{nbytes / 2**30:.2f}"


def _speedup(res: dict[str, dict], baseline: str, phase: str, batch: int, variant: str, ms: float) -> str:
    ref = res.get(baseline, {}).get(phase, {}).get(str(batch))
    return f"**{ref['ms'] / ms:.2f}×**" if ref is not None and not variant.startswith("bf16") else ""


def _measurement_rows(res: dict[str, dict], phase: str) -> list[str]:
    batches = sorted({int(b) for r in res.values() for b in r.get(phase, {})})
    rows = []
    for b in batches:
        for variant, r in res.items():
            m = r.get(phase, {}).get(str(b))
            if m is None:
                rows.append(f"| {phase} | {b} | {variant} | failed | | | | | | |")
                continue
            rows.append(f"| {phase} | {b} | {variant} | {m['ms']:.3f} | "
                        f"{_speedup(res, 'bf16', phase, b, variant, m['ms'])} | "
                        f"{_speedup(res, 'bf16_rope', phase, b, variant, m['ms'])} | {m['tokens_per_s']:.0f} | "
                        f"{_gib(m['peak_bytes'])} | {m['reps']} | {m.get('mode', '')} |")
    return rows


def markdown(meta: dict, res: dict[str, dict], errors: list[str] | None = None) -> str:
    what = ("one decoder layer (inputs_embeds in, final norm out)" if meta["level"] == "layer"
            else f"{meta['layers']}-layer model with embedding and LM head")
    lines = [f"## {meta['level']}: {what}", "",
             f"{shape_label(meta['hidden'], meta['intermediate'])}, random weights, BF16 activations. "
             f"{environment_line(meta)}.", "",
             f"Prefill: batch × {meta['seq']} tokens without KV cache; ms = median of `reps` timed forwards after "
             f"{meta['prefill_warmup']} warm-up forwards. Decode: ms per step (one new token per sequence, static KV "
             f"cache of {meta['seq']} tokens); ms = median of `reps` timings of {meta['decode_steps']} back-to-back "
             "steps after warm-up; mode says whether a step was a CUDA-graph replay. prefill_graph: the same prefill "
             "recorded once in a CUDA graph and replayed (GPU time without host launch overhead, both variants). "
             "Times from CUDA events (wall "
             "clock on the CPU). Peak: max allocated device memory during the measurement.", "",
             "vs BF16: against transformers' BF16 model; vs BF16 + RoPE kernel: against the same model with "
             "the one-kernel rotary embedding the fused W4A4 variants use (blank when not measured).", "",
             "| phase | batch | variant | ms | vs BF16 | vs BF16 + RoPE kernel | tokens/s | peak GiB | reps | mode |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += (_measurement_rows(res, "prefill") + _measurement_rows(res, "prefill_graph")
              + _measurement_rows(res, "decode"))
    lines += ["", "| variant | decoder linear weights MiB | BF16 / this | resident after build GiB |",
              "|---|---|---|---|"]
    bf16_bytes = res.get("bf16", {}).get("linear_weight_bytes")
    for variant, r in res.items():
        ratio = f"{bf16_bytes / r['linear_weight_bytes']:.2f}×" if bf16_bytes else ""
        lines.append(f"| {variant} | {r['linear_weight_bytes'] / 2**20:.1f} | {ratio} | {_gib(r['model_bytes'])} |")
    profiles = {v: r["breakdown_prefill_b1"] for v, r in res.items() if r.get("breakdown_prefill_b1")}
    if profiles:
        lines += ["", "GPU kernel time by stage, prefill batch 1 (one forward under torch.profiler, µs):", "",
                  breakdown_markdown(profiles).rstrip()]
    profiles = {v: r["breakdown_decode_b1"] for v, r in res.items() if r.get("breakdown_decode_b1")}
    if profiles:
        lines += ["", "GPU kernel time by stage, one decode step at batch 1 (mean of 10 eager steps under "
                  "torch.profiler, µs; the CUDA-graph step time above also holds the gaps between launches):", "",
                  breakdown_markdown(profiles).rstrip()]
    if errors:
        lines += ["", "Failed measurements:", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"
