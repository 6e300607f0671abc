# Sourced by the GPU scripts (repo root, on the device machine): the output folder $OUT, the
# package on PYTHONPATH (nothing installed there), unbuffered output, $bench (`duquant bench`
# from the source tree), and the GPU's name, clocks and temperature printed and kept in $OUT/gpu.txt.
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# shellcheck disable=SC2034  # used by the scripts that source this file
bench=(python3 -c "import sys; from duquant.bench import main; sys.exit(main(sys.argv[1:]))")
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
