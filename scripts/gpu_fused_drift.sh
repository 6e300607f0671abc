#!/usr/bin/env bash
# Which kernel moves SmolLM2's real-backend perplexity (--fuse) away from the simulated one:
# quantizes as scripts/gpu_real_backend.sh (same calibration, seed 0), then evaluates WikiText-2
# with --backend real --fuse under each switch: the quantizer's reciprocal (DUQUANT_FAST_QUANT=0
# restores the IEEE division) and the attention-operand kernels (DUQUANT_KV_KERNEL=0), with and
# without --fuse (the fusions one at a time: scripts/fused_ablation.py).
# Two calls: carry .carry/smollm2-a, then .carry/smollm2-b with this script.
set -uo pipefail
source "$(dirname "$0")/gpu_smollm2_duquant.sh"  # sets $OUT, $gguf and the quantized model $q
run() {  # name, env assignments..., then the eval flags after "--"
  local name=$1; shift
  local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  env "${envs[@]}" python3 -m duquant.cli eval "$q" --ppl wikitext2 --quiet --json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  python3 -c "import json,sys; r=json.load(open('$OUT/$name.json'))['results']['wikitext2']; print(f'$name: {r[\"ppl\"]:.3f}')"
}
run simulated X=1 -- --backend simulated
run real X=1 -- --backend real --no-fuse
run real_fused X=1 -- --backend real --fuse
run real_fused_div DUQUANT_FAST_QUANT=0 -- --backend real --fuse
run real_fused_no_kv_kernel DUQUANT_KV_KERNEL=0 -- --backend real --fuse
run real_no_kv_kernel DUQUANT_KV_KERNEL=0 -- --backend real --no-fuse
run real_fused_div_no_kv_kernel DUQUANT_FAST_QUANT=0 DUQUANT_KV_KERNEL=0 -- --backend real --fuse
