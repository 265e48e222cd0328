#!/usr/bin/env bash
# The GPU figures of the performance section, one part per call (each fits a 10-minute slot).
#
#   bash scripts/bench_gpu.sh PART OUTDIR [MSLD]
#
# PART:   eager    bench_throughput.py, all CUDA pairs, bf16, channels_last, batch 256, 224 px
#         compile  the same with --compile (compile warm-up reported apart)
#         tail     bench_se_tail.py: the fused SE tail against the plain ops, ResNet-50 shapes
#         data     bench_data.py on MSLD: DataLoader workers vs data.cache gpu / ram
#         train    semodel train wall time, SE-ResNet-18, 224 px, 30 epochs, eager and compiled
# OUTDIR: where the JSON files and logs go (created).
# MSLD:   the MSLD folder (with original/ and augmented/); default .bench/msld, a git-ignored
#         copy of ../shared/data/msld for machines that do not see ../shared.
set -euo pipefail

part=${1:?"usage: bash scripts/bench_gpu.sh eager|compile|tail|data|train OUTDIR [MSLD]"}
out=${2:?"usage: bash scripts/bench_gpu.sh PART OUTDIR [MSLD]"}
msld=${3:-.bench/msld}
mkdir -p "$out"
python - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("bench_gpu.sh: no CUDA device here; the CPU figures come from the scripts with --device cpu")
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
EOF

common=(--device cuda --batch-size 256 --image-size 224 --channels-last)
pairs=r50-timm,r50-tv,r50-se-overhead,r50-fused,d121-tv
case "$part" in
  eager)
    python scripts/bench_throughput.py "${common[@]}" --pairs "$pairs" --json "$out/gpu_eager.json" \
      --profile 25 2>&1 | tee "$out/gpu_eager.log" ;;
  compile)
    python scripts/bench_throughput.py "${common[@]}" --pairs "$pairs" --compile --rounds 3 \
      --json "$out/gpu_compile.json" 2>&1 | tee "$out/gpu_compile.log" ;;
  tail)
    python scripts/bench_se_tail.py --device cuda --batch-size 256 --image-size 224 --channels-last \
      --json "$out/gpu_tail.json" 2>&1 | tee "$out/gpu_tail.log" ;;
  data)
    test -d "$msld/augmented" || { echo "no $msld/augmented" >&2; exit 2; }
    python scripts/bench_data.py "$msld/augmented" --image-size 224 --device cuda --workers 0 4 8 \
      --json "$out/gpu_data.json" 2>&1 | tee "$out/gpu_data.log" ;;
  train)
    test -d "$msld/augmented" || { echo "no $msld/augmented" >&2; exit 2; }
    for compile in false true; do
      start=$(date +%s.%N)
      semodel train --config configs/monkeypox/se_resnet18.yaml --quiet \
        --set data.root="$msld/augmented" --set data.image_size=224 --set train.epochs=30 \
        --set data.cache=auto --set train.compile=$compile --set log.name=wall-compile-$compile \
        --set log.out_dir="$out/runs" 2>&1 | tee "$out/train_compile_$compile.log"
      end=$(date +%s.%N)
      python -c "print(f'semodel train, compile=$compile: {($end - $start):.1f} s wall, start to finish')" \
        | tee -a "$out/train_wall.txt"
    done ;;
  *)
    echo "unknown part '$part'; choose eager, compile, tail, data or train" >&2; exit 2 ;;
esac
