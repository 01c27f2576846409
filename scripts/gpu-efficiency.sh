#!/usr/bin/env bash
# The real-size cost table on a CUDA GPU, at each architecture's native resolution (docs/efficiency.md,
# "Real-size cost"): one prepared run, for the short GPU sessions. Peak memory is CUDA max_memory_allocated;
# weights are random (built offline from the published configs), the preset's half precision is used.
#
#   bash scripts/gpu-efficiency.sh                  # on the GPU machine (about 10 minutes on an H100-class card)
#   DIVISOR=20 RES=64 bash scripts/gpu-efficiency.sh  # a check of the script itself at toy size (CPU is fine)
#
# Writes docs/efficiency-gpu.md and the raw JSON under runs/bench/efficiency-gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
DIVISOR="${DIVISOR:-1}"
OUT="${OUT:-docs/efficiency-gpu.md}"
# SDXL's and SD 3.5's ShortFT stage 1 at 1024 px are estimated at 129 and 162 GB (docs/efficiency.md): that row
# reads "out of memory" and the run goes on; the memory-lever row is the one that fits.
KEY="shortft (stage 1),full (checkpointed),draft (K=1),shortft (stage 1) + vae_checkpoint + checkpoint_calls"
ALL="shortft (stage 1),shortft (stage 2),shortft (stage 4),draft-lv,draft (K=1),drtune,alignprop,refl,full (checkpointed),leapalign"
run() {  # arch resolution rows
  timeout "${ROW_TIMEOUT:-1500}" shortft bench efficiency --arch "$1" --resolutions "$2" --rows "$3" \
    --arch-divisor "$DIVISOR" --iters 2 --warmup 1 --threads 0 --reward symmetry --no-estimate \
    --out "$OUT" --workdir runs/bench/efficiency-gpu || echo "gpu-efficiency: $1 at $2 px failed (see runs/bench/efficiency-gpu/*.log)"
}
run sd15 "${RES:-512}" "$ALL"
run sdxl "${RES:-1024}" "$KEY"
run sd35m "${RES:-1024}" "$KEY"
echo "gpu-efficiency: wrote $OUT"
