"""duquant.bench on tiny models: the code paths of the layer, e2e and quantize levels run on
the CPU (no timing assertions), the kernel-name categorizer, and the decode step that must
stay inside the static KV cache however often it is replayed. CUDA-only paths skip."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from duquant.bench import breakdown as bd
from duquant.bench import build_parser, main
from duquant.bench.layer import (DEFAULT_VARIANTS, build_variant, decode_inputs, decode_step_fn, fill_static_cache,
                                 linear_weight_bytes, measure_decode, measure_prefill, run_layer_bench)
from duquant.modeling.static_cache import cache_write_counters

CPU = torch.device("cpu")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_llama(layers: int = 1):
    from transformers import LlamaConfig

    # hidden 128: the W4A4 variants use 128-blocks as at full size
    return LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
                       num_hidden_layers=layers, vocab_size=64, max_position_embeddings=256)


# --- kernel categories ------------------------------------------------------------------

@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel"
     "__5x_cublas", bd.GEMM16),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8>"
     "(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8::Params)", bd.GEMM16),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", bd.GEMM16),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false, false>", bd.GEMM16),
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128_warpgroupsize1x1x1_kernel__5x_cublas", bd.GEMM8),
    ("nvjet_qqtst_128x256_128x6_2x1_2cta_v_bz_TNT", bd.GEMM8),
    ("void cutlass::Kernel2<cutlass_80_tensorop_s8_i16832gemm_s8_256x128_64x3_tn_align16>(Params)", bd.GEMM8),
    ("int8_gemm_kernel", bd.GEMM8),
    ("rot1_scatter_kernel", bd.TRANSFORM),
    ("rot2_stats_kernel", bd.TRANSFORM),
    ("rot2_quant_kernel", bd.TRANSFORM),
    ("transform_quant_kernel", bd.TRANSFORM),
    ("expand_w4_kernel", bd.EXPAND),
    ("w4a8_decode_kernel", bd.DECODE),
    ("w4a8_gemv_kernel", bd.DECODE),
    ("flash_fwd_kernel", bd.ATTENTION),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t>"
     ", false, true, false, false, true, true, false, false>(pytorch_flash::Flash_fwd_params)", bd.ATTENTION),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
     "cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)", bd.ATTENTION),
    ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<"
     "at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}>>", bd.OTHER),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", bd.ATTENTION),
    ("Memcpy DtoD (Device -> Device)", bd.OTHER),
])
def test_kernel_category(name, category):
    assert bd.kernel_category(name) == category


def test_kernel_times_use_device_entries_under_either_attribute_name():
    cuda, cpu = "DeviceType.CUDA", "DeviceType.CPU"
    averages = [
        SimpleNamespace(key="nvjet_qqtst_128x256", device_type=cuda, device_time_total=30.0),  # torch >= 2.4
        SimpleNamespace(key="rot2_quant_kernel", device_type=cuda, cuda_time_total=12.0),  # older torch
        SimpleNamespace(key="aten::_scaled_mm", device_type=cpu, device_time_total=30.0),  # a CPU op: its kernel counts
    ]
    times = bd.kernel_times_us(averages)
    assert times == {"nvjet_qqtst_128x256": 30.0, "rot2_quant_kernel": 12.0}
    cats = bd.by_category(times)
    assert cats[bd.GEMM8] == 30.0 and cats[bd.TRANSFORM] == 12.0 and set(cats) == set(bd.CATEGORIES)
    table = bd.breakdown_markdown({"w4a4": {"us": cats, "total_us": 42.0}})
    assert "| 8-bit GEMM | 30 (71%) |" in table and "**42**" in table


def test_kernel_stats_count_launches():
    cuda = "DeviceType.CUDA"
    averages = [SimpleNamespace(key="w4a8_gemv_kernel", device_type=cuda, device_time_total=20.0, count=4),
                SimpleNamespace(key="w4a8_gemv_kernel", device_type=cuda, device_time_total=4.0, count=1),
                SimpleNamespace(key="row_transform_quant_kernel", device_type=cuda, device_time_total=9.0, count=3)]
    assert bd.kernel_stats(averages) == {"w4a8_gemv_kernel": (24.0, 5), "row_transform_quant_kernel": (9.0, 3)}
    launches = {bd.DECODE: 5.0, bd.TRANSFORM: 3.0}
    cats = bd.by_category(bd.kernel_times_us(averages))
    table = bd.breakdown_markdown({"w4a4": {"us": cats, "total_us": 33.0,
                                            "launches": {c: launches.get(c, 0.0) for c in bd.CATEGORIES}}})
    assert "| kernel launches | 8 |" in table and "| decode GEMM | 24 (73%) |" in table


# --- layer / e2e helpers on CPU ---------------------------------------------------------

def test_w4a4_variant_replaces_every_decoder_linear():
    from duquant.modeling.real_linear import RealQuantLinear

    config = tiny_llama(layers=2)
    bf16, w4a4 = build_variant(config, "bf16", CPU), build_variant(config, "w4a4", CPU)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert sum(isinstance(m, RealQuantLinear) for m in w4a4.modules()) == 7 * 2
    # packed 4-bit codes + per-channel scale and zero vs BF16 weights
    assert linear_weight_bytes(bf16) / linear_weight_bytes(w4a4) > 3


@pytest.mark.parametrize("e2e", [False, True])
def test_decode_step_is_the_same_step_every_time(e2e):
    """Regression for run 3's index_copy_ assert: transformers' StaticCache advances its own
    write position on every forward (and every graph replay), past max_cache_len after 8
    extra steps here; the step rewinds it, so 12 calls stay in bounds and agree."""
    model = build_variant(tiny_llama(layers=2), "bf16", CPU)
    seq, batch = 24, 2
    prefix, new = decode_inputs(model, batch, seq, e2e, CPU)
    cache = fill_static_cache(model, prefix, chunk=10)
    assert [int(c) for c in cache_write_counters(cache)] == [seq, seq]
    step = decode_step_fn(model, cache, new, seq, e2e)
    with torch.no_grad():
        outs = [step() for _ in range(12)]
        first = outs[0].logits if e2e else outs[0].last_hidden_state
        last = outs[-1].logits if e2e else outs[-1].last_hidden_state
        assert torch.equal(first, last)
        assert [int(c) for c in cache_write_counters(cache)] == [seq + 1, seq + 1]
        keys = cache.layers[0].keys
        assert keys.shape[2] == seq + 8 and bool((keys[:, :, seq + 1:] == 0).all())
        if not e2e:  # the cached step equals the last position of a forward over prefix + token
            full = model.model(inputs_embeds=torch.cat([prefix, new], 1), use_cache=False).last_hidden_state
            torch.testing.assert_close(first, full[:, -1:], rtol=0, atol=2e-2)


def test_w4a4_variants_share_transforms_and_fuse_norms():
    """make_w4a4: q/k/v (and gate/up) share one transform_id, so each activation is
    quantized once; the _fused variants replace both norms and the MLP of every layer."""
    from duquant.modeling.fusion import DeferredRMSNorm, FusedSwiGLU

    for variant, fused in (("w4a4", False), ("w4a4_fused", True)):
        model = build_variant(tiny_llama(layers=2), variant, CPU)
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, getattr(layer.mlp, "mlp", layer.mlp)  # FusedSwiGLU holds the MLP
            assert attn.q_proj.transform_id == attn.k_proj.transform_id == attn.v_proj.transform_id
            assert mlp.gate_proj.transform_id == mlp.up_proj.transform_id != attn.q_proj.transform_id
            assert isinstance(layer.input_layernorm, DeferredRMSNorm) is fused
            assert isinstance(layer.post_attention_layernorm, DeferredRMSNorm) is fused
            assert isinstance(layer.mlp, FusedSwiGLU) is fused


@pytest.mark.parametrize("variant, fused", [("bf16", False), ("bf16_rope", True), ("w4a4", False),
                                            ("w4a4_fused", True), ("w4a4_fused_stock_rope", False)])
def test_variants_with_the_one_kernel_rope(variant: str, fused: bool) -> None:
    """The fused W4A4 variants run RoPE as one kernel (as to_real_backend does); bf16_rope is the
    BF16 model with the same kernel, the baseline that separates that gain from W4A4's."""
    from duquant.modeling.fused_rope import is_fused

    model = build_variant(tiny_llama(layers=2), variant, CPU)
    assert all(is_fused(layer.self_attn) is fused for layer in model.model.layers)


@pytest.mark.parametrize("variant", ["bf16", "w4a4", "w4a4_fused"])
def test_prefill_and_decode_measurements_run_on_cpu(variant):
    model = build_variant(tiny_llama(), variant, CPU)
    p = measure_prefill(model, 2, 16, False, CPU, reps=1, warmup=1)
    d = measure_decode(model, 2, 16, False, CPU, steps=2, reps=1)
    assert p["ms"] > 0 and p["peak_bytes"] is None and p["reps"] == 1
    assert d["ms"] > 0 and d["mode"] == "eager (no CUDA)" and d["cache_tokens"] == 16


@pytest.mark.parametrize("level", ["layer", "e2e"])
def test_run_layer_bench_writes_json_and_markdown(level, tmp_path):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    run_layer_bench(level, [1], [1], out_json=str(out_json), out_md=str(out_md), device="cpu",
                    config=tiny_llama(layers=1 if level == "layer" else 2), seq=16, reps=1, decode_steps=2)
    payload = json.loads(out_json.read_text())
    variants = DEFAULT_VARIANTS[level]
    assert "bf16" in variants and any(v.endswith("_fused") for v in variants)
    assert list(payload["results"]) == variants and payload["errors"] == []
    for r in payload["results"].values():
        assert set(r["prefill"]) == {"1"} and set(r["decode"]) == {"1"} and r["linear_weight_bytes"] > 0
    md = out_md.read_text()
    assert "| phase | batch | variant | ms |" in md and "torch " in md and "transformers " in md
    assert md.count("| prefill | 1 |") == len(variants) and md.count("| decode | 1 |") == len(variants)


# --- quantize level ---------------------------------------------------------------------

def test_quantize_bench_runs_duquant_on_a_tiny_model(tmp_path):
    import importlib

    from duquant.bench.quantization import STAGES, run_quantize_bench

    pipeline = importlib.import_module("duquant.quantize")
    before = {name: getattr(pipeline, name) for name in STAGES}
    out_json, out_md = tmp_path / "q.json", tmp_path / "q.md"
    config = tiny_llama(layers=2)
    config.hidden_size, config.intermediate_size = 64, 128
    r = run_quantize_bench(nsamples=2, seqlen=64, out_json=str(out_json), out_md=str(out_md), device="cpu",
                           config=config, progress=False)
    assert r["quantized_linears"] == 7 * 2
    assert set(r["stage_seconds_measured"]) == set(STAGES) and r["total_s"] > 0 and r["per_layer_mean_s"] > 0
    assert {"capture", "fit"} <= set(r["stage_seconds"])
    assert "2 x 64 random token ids" in r["meta"]["calibration"]
    assert json.loads(out_json.read_text())["total_s"] == r["total_s"]
    assert "| fit_groups |" in out_md.read_text()
    assert {name: getattr(pipeline, name) for name in STAGES} == before  # timers removed


# --- command line -----------------------------------------------------------------------

def test_bench_parser_knows_the_quantize_level():
    args = build_parser().parse_args(["--level", "quantize", "--nsamples", "8", "--layers", "2"])
    assert (args.level, args.nsamples, args.layers) == ("quantize", 8, 2)
    assert build_parser().parse_args(["--level", "e2e"]).nsamples == 128


def test_bench_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only message")
    assert main(["--level", "quantize"]) == 2
    assert "CUDA" in capsys.readouterr().out


# --- CUDA only --------------------------------------------------------------------------

@cuda_only
def test_layer_bench_on_cuda_uses_a_graph_and_profiles(tmp_path):
    payload = run_layer_bench("layer", [1], [1, 4], device="cuda", config=tiny_llama(), seq=64, reps=2,
                              decode_steps=4)
    assert payload["errors"] == [], payload["errors"]
    for r in payload["results"].values():
        assert all(d["mode"] == "cuda-graph" for d in r["decode"].values()), r["decode"]
        assert r["prefill_graph"]["1"]["ms"] > 0, r.get("prefill_graph")
        assert r["breakdown_prefill_b1"]["total_us"] > 0
        assert r["breakdown_decode_b1"]["total_us"] > 0 and sum(r["breakdown_decode_b1"]["launches"].values()) > 0
    assert payload["results"]["w4a4"]["breakdown_prefill_b1"]["us"][bd.TRANSFORM] > 0
    assert payload["results"]["w4a4"]["breakdown_decode_b1"]["us"][bd.TRANSFORM] > 0


@cuda_only
def test_profile_breakdown_finds_a_bf16_gemm():
    a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    r = bd.profile_breakdown(lambda: a @ a, torch.device("cuda"))
    assert r["us"][bd.GEMM16] > 0, r["top_kernels"]


def test_cli_variant_names_are_the_benchmark_variants() -> None:
    """`duquant bench --variants` offers exactly the variants bench.layer can build."""
    from duquant.bench.layer import VARIANTS
    variants = next(a for a in build_parser()._actions if a.dest == "variants")
    assert variants.choices == list(VARIANTS)
    assert build_parser().parse_args(["--variants", "w4a4_fused_pdl"]).variants == ["w4a4_fused_pdl"]
