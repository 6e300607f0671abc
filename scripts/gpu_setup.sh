# Sourced by the GPU scripts: reassemble SmolLM2 from the two carried halves, install the gguf
# wheel, point DUQUANT_DATA_DIR at the carried data. Sets $gguf.
gguf=.carry/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
  cat .carry/smollm2-a/gguf.part0 .carry/smollm2-b/gguf.part1 > "$gguf"
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c -
fi
[ -d .carry/site/gguf ] || python3 -m pip install -q --no-index --no-deps --target .carry/site .carry/smollm2-a/*.whl
if [ ! -d .carry/data ]; then cp -r .carry/smollm2-b/data .carry/data; fi
export PYTHONPATH=$PWD/src:$PWD/.carry/site DUQUANT_DATA_DIR=$PWD/.carry/data PYTHONUNBUFFERED=1
