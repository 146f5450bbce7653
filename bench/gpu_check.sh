#!/usr/bin/env bash
# The checks that need a GPU, as one command for a lent machine (bench/README.md, "On a GPU").
# Expects, beside the working tree: .whl/ (wheels the machine lacks: diffusers, pydantic, ...) and
# .gpu/cache (a built digits world and bench/out/data's concept data as .gpu/data). Each part has its own
# time limit, so one that hangs costs only its share; logs and JSON go to $OUT/gpu.tar.gz after each part.
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

PARTS=${PARTS:-fd_digits fd_sd14 mem_sd14 meta_step tests mem_sdxl}  # which parts, in this order
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
  --variants "esd ckpt+bf16 teacher,esd+meta ckpt+bf16 teacher,esd ckpt+bf16 teacher+autocast,esd+meta ckpt+bf16 teacher+autocast"
part meta_step 100 python3 bench/meta_step.py --world digits --device cuda --steps "${META_STEPS:-20}" --batch 8 \
  --threads 4 --variants "${META_VARIANTS:-base,first,second,reference}" --data-cache .gpu/data \
  --out "$WORK/meta_step.json"
# the test suite with CUDA visible: every study the tests run picks the GPU (model.device: auto)
TAIL=30 part tests 150 python3 -m pytest -v -p no:cacheprovider -n 12 --timeout 120 -rfE
part mem_sdxl 130 python3 bench/memory.py --arch sdxl --steps 2 --threads 16 --out "$WORK/mem_sdxl.json" \
  --variants "esd ckpt+bf16 teacher,esd+meta ckpt+bf16 teacher"
