#!/usr/bin/env bash
# The checks that need a GPU, as one command for a lent machine (bench/README.md, "On a GPU").
# Expects, beside the working tree (both ignored through .git/info/exclude, and named in the call's carry):
#   .whl/       wheels the GPU machine's image lacks (it has torch, transformers, accelerate, huggingface_hub):
#               python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                 --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 pydantic==2.14.4 \
#                 pydantic_core==2.50.5 annotated-types typing-inspection typing_extensions platformdirs peft \
#                 importlib_metadata nudenet
#   .gpu/cache  a copy of the cache folder holding the built digits world (metaunlearn world digits; the
#               folder metaunlearn.worlds.cache_root() names); meta_step's concept data go to .gpu/data.
# Each part has its own time limit, so one that hangs costs only its share; logs and JSON go to
# $OUT/gpu.tar.gz after each part. The device call that runs it: command `bash bench/gpu_check.sh`,
# carry [".whl", ".gpu"], timeout up to 590 s (PARTS="..." picks parts; bench/RESULTS.md, "On a GPU").
# The parts' limits add up to 1100 s, more than one call may run: split them, e.g. PARTS="fd_digits fd_sd14
# mem_sd14 meta_step", PARTS="fp16_meta" and PARTS="tests mem_sdxl".
set -u
OUT=${OUT:-bench/out/gpu}
WORK=$(mktemp -d)
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 METAUNLEARN_CACHE=$PWD/.gpu/cache TOKENIZERS_PARALLELISM=false
# the console script, for the tests that run it (no index there: no build isolation)
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "no editable install"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$WORK/env.txt"
python3 -c "import torch, diffusers, transformers, peft, accelerate; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, \
'accelerate', accelerate.__version__)" | tee -a "$WORK/env.txt"

PARTS=${PARTS:-fd_digits fd_sd14 mem_sd14 meta_step fp16_meta tests mem_sdxl}  # which parts, in this order
part() {  # part NAME SECONDS COMMAND...: run it under a limit, keep its log, show its end
  local name=$1 limit=$2 begin=$SECONDS
  shift 2
  [[ " $PARTS " == *" $name "* ]] || return 0
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - begin)) s"
  grep -v "it/s\]$" "$WORK/$name.log" | tail -n "${TAIL:-14}"
  tar czf "$OUT/gpu.tar.gz" -C "$WORK" .
}

part fd_digits 60 python3 bench/fd_check.py --model digits --device cuda --out "$WORK/fd_digits.json"
part fd_sd14 120 python3 bench/fd_check.py --model sd14 --device cuda --latent 32 --threads 16 \
  --out "$WORK/fd_sd14.json"
part mem_sd14 150 python3 bench/memory.py --arch sd14 --steps 3 --threads 16 --out "$WORK/mem_sd14.json" \
  --variants "esd ckpt+bf16 teacher,esd+meta ckpt+bf16 teacher,esd ckpt+bf16 teacher+fp16,esd+meta ckpt+bf16 teacher+fp16"
part meta_step 100 python3 bench/meta_step.py --world digits --device cuda --steps "${META_STEPS:-20}" --batch 8 \
  --threads 4 --variants "${META_VARIANTS:-base,first,second,reference}" --data-cache .gpu/data \
  --out "$WORK/meta_step.json"
# the functional variant (no checkpointing) left out: four variants took 255 s on an H100
part fp16_meta 300 python3 bench/fp16_meta.py --device cuda --latent 32 --threads 16 \
  --variants "esd,esd+meta,esd+meta sgd+sharpness,esd+meta adam+lora" --out "$WORK/fp16_meta.json"
# the test suite with CUDA visible: every study the tests run picks the GPU (model.device: auto); TESTS="files"
# picks some. 240 s: the whole suite on 12 workers took over 150 s, the two-process tests last.
# shellcheck disable=SC2086
TAIL=30 part tests 240 python3 -m pytest -v -p no:cacheprovider -n 12 --timeout 200 -rfE ${TESTS:-}
part mem_sdxl 130 python3 bench/memory.py --arch sdxl --steps 2 --threads 16 --out "$WORK/mem_sdxl.json" \
  --variants "esd ckpt+bf16 teacher+autocast,esd+meta ckpt+bf16 teacher+autocast"
