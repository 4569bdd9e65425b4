#!/usr/bin/env bash
# The GPU checks the issues name, as one script for a CUDA machine (not a test; CI has no GPU).
#
#   bash benchmarks/gpu_check.sh devices   # every recipe builds, warm-starts, trains and samples on cuda:0
#   bash benchmarks/gpu_check.sh memory    # bf16 DMD2 on an SDXL-layout UNet: peak memory vs `distill plan`
#   bash benchmarks/gpu_check.sh fid       # FID pipeline throughput against clean-fid's gen= path
#   bash benchmarks/gpu_check.sh cli       # train / sample / export a toy and the digits demo on the GPU
#   bash benchmarks/gpu_check.sh fsdp      # FSDP2 DMD2 + GAN head on nccl, sharded checkpoint resume vs ddp
#
# Logs and result files go to $OUT (default benchmarks/results). Each part has its own time limit so one
# slow part cannot eat the others' time.
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}

part() {  # part NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 40
  echo "=== $name rc=$? in $((SECONDS - start))s"
}

for what in "${@:-devices memory fid cli}"; do for w in $what; do case $w in
  devices)
    DISTILL_TEST_DEVICE=cuda part devices 200 $PY -m pytest -q -x -p no:cacheprovider tests/test_devices.py ;;
  memory)
    part memory 240 $PY benchmarks/bench_gpu_memory.py --out "$OUT/gpu_memory.json" ;;
  fid)
    part fid 200 $PY benchmarks/bench_fid_throughput.py --device cuda --extractor inception-arch --num 1024 \
      --sizes 256 512 --batch-size 128 --workers 8 --out "$OUT/fid_throughput.json" ;;
  cli)
    tmp=$(mktemp -d)
    part cli_toy 120 bash -c "distill train recipes/toy_ring8_dmd2.yaml --out $tmp/toy --no-progress train.steps=300 \
      && distill sample $tmp/toy --n 4096 --out $tmp/toy.npy --device cuda"
    part cli_demo 300 distill demo --out "$tmp/demo" --methods dmd2,sid,lcm --no-progress
    cp "$tmp/demo/report.md" "$OUT/demo_report.md" ;;
  fsdp)
    part fsdp 200 $PY benchmarks/fsdp_gpu_check.py "$(mktemp -d)" "$OUT/fsdp_gpu_check.json" ;;
  *) echo "unknown part $w"; exit 2 ;;
esac; done; done
