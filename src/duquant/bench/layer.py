"""Decoder-layer and end-to-end benchmarks: a LLaMA-2-7B-shaped model with random weights,
BF16 against W4A4 (every linear layer a `RealQuantLinear` with DuQuant's online transform
on its input and random packed 4-bit codes), measured in the same run.

Prefill: batch × 2048 tokens, median of CUDA-event-timed forwards after warm-up.
Decode: one new token per sequence against a 2048-token static KV cache, captured in a
CUDA graph and timed over many replays (eager timing, marked as such, if capture fails).
Peak memory: `torch.cuda.max_memory_allocated` around each measurement.
level "layer": a 1-layer model (embedding and LM head excluded: inputs_embeds in, the
final norm's output out); level "e2e": the whole 32-layer model with its LM head.
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch
from torch import nn

from .output import write_results

SEQ = 2048


def _config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096,
                       torch_dtype=torch.bfloat16)


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q.float()


def make_w4a4(model: nn.Module, seed: int = 0, prefill_weight: str | None = None) -> int:
    """Replace every nn.Linear inside the decoder layers by a RealQuantLinear with random
    4-bit codes and a DuQuant transform (R1 · P · R2, 128-blocks); q/k/v and gate/up share
    one transform, as in a DuQuant-quantized model. Returns the packed weight bytes."""
    from duquant.modeling.qlinear import QuantLinear
    from duquant.modeling.real_linear import RealQuantLinear
    from duquant.quant.quantizer import QuantSpec
    from duquant.transforms.online import OnlineTransform

    gen = torch.Generator().manual_seed(seed)
    wspec, aspec = QuantSpec(bits=4, clip=1.0), QuantSpec(bits=4, clip=0.9)
    nbytes = 0
    for layer in model.model.layers:
        groups = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o",
                  "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down"}
        transforms: dict[str, OnlineTransform] = {}
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, nn.Linear):
                    continue
                k, n = lin.in_features, lin.out_features
                device = lin.weight.device
                if groups[name] not in transforms:
                    blk = 128 if k % 128 == 0 else 64
                    transforms[groups[name]] = OnlineTransform(
                        k, _orthogonal(blk, gen), torch.randperm(k, generator=gen), _orthogonal(blk, gen)).to(device)
                q = QuantLinear(k, n, lin.bias is not None, wspec, aspec, transforms[groups[name]], torch.bfloat16)
                q = q.to(device)
                q.qweight.copy_(torch.randint(0, 256, q.qweight.shape, dtype=torch.uint8, generator=gen))
                q.w_scale.copy_(torch.rand(n, 1, generator=gen) * 1e-3 + 1e-3)
                q.w_zero.fill_(8.0)
                setattr(parent, name, RealQuantLinear(q, prefill_weight))
                nbytes += q.qweight.numel() + 8 * n
                del lin
    return nbytes


def _linear_bytes_bf16(model: nn.Module) -> int:
    return sum(m.weight.numel() * 2 for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear))


def _time_events(fn: Callable[[], object], reps: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)  # ms


def _prefill(model: nn.Module, batch: int, e2e: bool) -> tuple[float, int]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if e2e:
        ids = torch.randint(0, model.config.vocab_size, (batch, SEQ), device="cuda")
        fn = lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)  # noqa: E731
    else:
        h = torch.randn(batch, SEQ, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
        fn = lambda: model.model(inputs_embeds=h, use_cache=False)  # noqa: E731
    with torch.no_grad():
        ms = _time_events(fn, reps=5 if batch >= 16 else 10)
    return ms, torch.cuda.max_memory_allocated()


def _decode(model: nn.Module, batch: int, e2e: bool, steps: int = 20) -> tuple[float, int, str]:
    """ms per decode step (one token for each of `batch` sequences, KV cache of SEQ tokens)."""
    from transformers import StaticCache

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=SEQ + 8)
    pos = torch.full((1,), SEQ, device="cuda", dtype=torch.long)
    with torch.no_grad():
        # fill the cache with a (random-input) prefill of SEQ tokens, chunked to bound memory
        for c0 in range(0, SEQ, 512):
            cp = torch.arange(c0, c0 + 512, device="cuda")
            h = torch.randn(batch, 512, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
            model.model(inputs_embeds=h, past_key_values=cache, cache_position=cp, use_cache=True)
        if e2e:
            ids = torch.randint(0, cfg.vocab_size, (batch, 1), device="cuda")
            step = lambda: model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True)  # noqa: E731
        else:
            x = torch.randn(batch, 1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
            step = lambda: model.model(inputs_embeds=x, past_key_values=cache, cache_position=pos,  # noqa: E731
                                       use_cache=True)
        mode = "cuda-graph"
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run = graph.replay
        except Exception as e:  # noqa: BLE001 - record and fall back to eager timing
            print(f"graph capture failed ({type(e).__name__}: {str(e)[:160]}); timing eagerly", flush=True)
            mode, run = "eager", step
        ms = _time_events(lambda: [run() for _ in range(steps)], reps=5) / steps
    return ms, torch.cuda.max_memory_allocated(), mode


def run_layer_bench(level: str, batches: list[int] | None, decode_batches: list[int] | None, layers: int | None,
                    out_json: str | None, out_md: str | None) -> dict:
    import triton
    from transformers import LlamaForCausalLM

    e2e = level == "e2e"
    n_layers = layers or (32 if e2e else 1)
    batches = batches or ([1, 4] if e2e else [1, 4, 16])
    decode_batches = [b for b in (decode_batches or ([1, 16] if e2e else [1, 4, 16, 64])) if b > 0]
    torch.manual_seed(0)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "level": level, "layers": n_layers, "seq": SEQ}
    results: dict[str, dict] = {}
    for variant in ("bf16", "w4a4"):
        with torch.device("cuda"):
            model = LlamaForCausalLM(_config(n_layers)).to(torch.bfloat16).eval()
        model.config.use_cache = True
        lin_bytes = _linear_bytes_bf16(model)
        if variant == "w4a4":
            lin_bytes = make_w4a4(model)
        torch.cuda.synchronize()
        r: dict[str, object] = {"linear_weight_bytes": lin_bytes, "model_bytes": torch.cuda.memory_allocated()}
        for b in batches:
            try:
                ms, peak = _prefill(model, b, e2e)
                r[f"prefill_b{b}_ms"], r[f"prefill_b{b}_peak_bytes"] = ms, peak
                print(f"{variant} prefill b={b}: {ms:.2f} ms, peak {peak / 2**30:.2f} GiB", flush=True)
            except Exception as e:  # noqa: BLE001 - OOM at batch 16 e2e, say
                print(f"{variant} prefill b={b} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        for b in decode_batches:
            try:
                ms, peak, mode = _decode(model, b, e2e)
                r[f"decode_b{b}_ms"], r[f"decode_b{b}_peak_bytes"], r[f"decode_b{b}_mode"] = ms, peak, mode
                print(f"{variant} decode b={b}: {ms:.3f} ms/step ({b / ms * 1e3:.0f} tok/s, {mode}), "
                      f"peak {peak / 2**30:.2f} GiB", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{variant} decode b={b} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        results[variant] = r
        del model
        torch.cuda.empty_cache()
    md = markdown(meta, results, batches, decode_batches)
    print(md)
    write_results({"meta": meta, "results": results}, md, out_json, out_md)
    return results


def markdown(meta: dict, res: dict, batches: list[int], decode_batches: list[int]) -> str:
    b16, w4 = res.get("bf16", {}), res.get("w4a4", {})
    what = "one decoder layer" if meta["level"] == "layer" else f"{meta['layers']}-layer model + LM head"
    lines = [f"{meta['level']} ({what}, LLaMA-2-7B shapes, random weights); GPU {meta['gpu']}, torch {meta['torch']}, "
             f"triton {meta['triton']}", "",
             "| phase | batch | BF16 ms | W4A4 ms | speedup | BF16 peak GiB | W4A4 peak GiB |", "|---|---|---|---|---|---|---|"]

    def row(phase: str, key: str, b: int) -> None:
        t0, t1 = b16.get(f"{key}_ms"), w4.get(f"{key}_ms")
        if t0 is None or t1 is None:
            lines.append(f"| {phase} | {b} | {t0 or '—'} | {t1 or '—'} | — | | |")
            return
        p0, p1 = b16.get(f"{key}_peak_bytes", 0) / 2**30, w4.get(f"{key}_peak_bytes", 0) / 2**30
        extra = f" ({w4.get(f'{key}_mode')})" if phase == "decode" else ""
        lines.append(f"| {phase}{extra} | {b} | {t0:.3f} | {t1:.3f} | **{t0 / t1:.2f}×** | {p0:.2f} | {p1:.2f} |")

    for b in batches:
        row("prefill", f"prefill_b{b}", b)
    for b in decode_batches:
        row("decode", f"decode_b{b}", b)
    if b16 and w4:
        lines += ["", f"Linear-layer weight bytes: BF16 {b16['linear_weight_bytes'] / 2**20:.0f} MiB, W4A4 "
                  f"{w4['linear_weight_bytes'] / 2**20:.0f} MiB ({b16['linear_weight_bytes'] / w4['linear_weight_bytes']:.2f}× "
                  f"smaller); model resident {b16['model_bytes'] / 2**30:.2f} vs {w4['model_bytes'] / 2**30:.2f} GiB"]
    return "\n".join(lines) + "\n"
