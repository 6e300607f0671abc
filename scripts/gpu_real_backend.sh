#!/usr/bin/env bash
# Real W4A4 backend against the simulated one on SmolLM2-135M, on the GPU machine.
# Here, first: ../shared/tools/split-smollm2.sh. Call 1 carries .carry/smollm2-a (any command);
# call 2, at once, carries .carry/smollm2-b and runs: OUT=$OUT bash scripts/gpu_real_backend.sh
# Quantizes DuQuant W4A4 (C4 128×2048 calibration, seed 0, as results/smollm2), saves it, then
# evaluates the saved model with --backend simulated, real --no-fuse, real --fuse and real --fuse with the rows
# transform kernel forced (all windows), and generates a sample in real mode.
# Lands in $OUT: quantize.json, eval_{simulated,real,real_fused,real_fused_rows}.json, logs.
set -uo pipefail
source "$(dirname "$0")/gpu_smollm2_duquant.sh"  # sets $OUT, $gguf and the quantized model $q
python3 -m duquant.cli eval "$q" --ppl wikitext2,c4 --backend simulated --quiet --json "$OUT/eval_simulated.json" 2>&1 | tail -4
python3 -m duquant.cli eval "$q" --ppl wikitext2,c4 --backend real --no-fuse --quiet --json "$OUT/eval_real.json" 2>&1 | tail -4
python3 -m duquant.cli eval "$q" --ppl wikitext2,c4 --backend real --fuse --quiet \
  --json "$OUT/eval_real_fused.json" 2>&1 | tail -3
# the rows transform kernel at every M (SmolLM2's 9 and 12 blocks are padded in its tile; auto takes tiles there)
DUQUANT_TRANSFORM_KERNEL=rows python3 -m duquant.cli eval "$q" --ppl wikitext2,c4 --backend real --fuse --quiet \
  --json "$OUT/eval_real_fused_rows.json" 2>&1 | tail -3
python3 -m duquant.cli generate "$q" --backend real --chat --max-new-tokens 40 \
  --prompt "What is the capital of France?" 2>&1 | tail -3
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
sim, real, fused, rows = (json.load(open(f"{out}/eval_{b}.json"))["results"]
                          for b in ("simulated", "real", "real_fused", "real_fused_rows"))
for name in sim:
    s, r, f, w = sim[name]["ppl"], real[name]["ppl"], fused[name]["ppl"], rows[name]["ppl"]
    print(f"{name}: simulated {s:.3f}  real {r:.3f} ({100 * (r - s) / s:+.3f}%)  real+fused {f:.3f} "
          f"({100 * (f - s) / s:+.3f}%)  real+fused, rows kernel {w:.3f} ({100 * (w - s) / s:+.3f}%)  (eval s: "
          f"{sim[name]['seconds']} / {real[name]['seconds']} / {fused[name]['seconds']} / {rows[name]['seconds']})")
PY
