#!/usr/bin/env bash
# The checks a CUDA machine adds to the CPU test suite, as one script (about 8 minutes on one H200):
#   1. one RoDA adaptation step timed on the GPU (benchmarks/bench_adapt_step.py --device cuda);
#   2. notebook 03's methods and the named RoDA variants on the smoke data with device=auto (CUDA), to
#      compare with the same grid on CPU (the same code path, no device-specific branch);
#   3. DPDL and DRA fine-tuned end to end at 448 px (the papers' setting) on HeadCT and BrainMRI, M = 10,
#      one job per (task, seed) sharing the GPU (about 80 s per run with two jobs; more jobs share it better).
#      Fold in with `scripts/run_dpdl.py --compare results/real_full/05_finetune_runs.csv
#      results/real_full/05_finetune_runs.csv <WORK>/dpdl*_runs.csv` (the table is also one of the inputs).
#   4. (CHECKS=leads) notebook 08's controlled changes too slow on CPU (the plan's-spread epsilon alone, and with the
#      semi-relaxed plan: hundreds of Sinkhorn iterations a step) on real categories, one job per task.
#      Carry the data (RODA_TASKS under DATA_ROOT; mind the 64 MiB carry limit: two MVTec categories at a time).
#      Fold in with `scripts/run_roda_grid.py --out results/real_full/08_lead_grid.csv --merge <WORK>/leads_*.csv`.
# Every result is written as it is produced into $WORK (a stopped job keeps what finished); at the end $OUT
# receives log.txt and results.tgz (the CSVs and the benchmark transcript).
#
#   OUT=/tmp/gpu_check DATA_ROOT=../shared/data bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}
DATA=${DATA_ROOT:-../shared/data}
PY=${PY:-python3}
SECONDS_DPDL=${SECONDS_DPDL:-330}   # per DPDL job
EPOCHS=${EPOCHS:-50}                # DPDL epochs of 20 iterations (the paper: 50)
DEVICE=${DEVICE:-cuda}              # of the DPDL jobs (the other checks use device=auto)
SEEDS=${SEEDS:-2,3,4}               # results/real_full/05_finetune_runs.csv holds seeds 0-1 end to end, 0-4 frozen
TASKS=${TASKS:-headct,brainmri}
MODES=${MODES:-input}               # input: end to end; frozen: the frozen backbone at the same size
SIZE=${SIZE:-448}                    # DPDL image size (the papers: 448)
WORK=${WORK:-/tmp/gpu_check_work}
CHECKS=${CHECKS:-bench,smoke,dpdl} # any of bench, smoke, dpdl, leads
RODA_TASKS=${RODA_TASKS:-mvtec/screw,mvtec/bottle}
RODA_SEEDS=${RODA_SEEDS:-0,1,2}
has() { [[ ",$CHECKS," == *",$1,"* ]]; }
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD" CUBLAS_WORKSPACE_CONFIG=:4096:8
log() { echo "== $(date +%T) $*" >> "$OUT/log.txt"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"; nproc; } >> "$OUT/log.txt" 2>&1

if has bench; then
  log "1. one RoDA adaptation step on the GPU"
  timeout "${SECONDS_BENCH:-90}" $PY benchmarks/bench_adapt_step.py --device auto --repeats 9 --threads 4 > "$WORK/bench_adapt_step.txt" 2>&1
  log "bench rc=$?"
fi

pids=()
has dpdl && log "3. DPDL / DRA at $SIZE px ($MODES), one job per task and seed, all sharing the GPU"
has dpdl && for task in ${TASKS//,/ }; do
  for seed in ${SEEDS//,/ }; do
    for mode in ${MODES//,/ }; do
      if [ "$mode" = input ]; then ft="TAIL=1 TAIL_INPUT=input"; else ft=""; fi
      env $ft DEVICE="$DEVICE" IMAGE_SIZE="$SIZE" DATA_ROOT="$DATA" THREADS=2 timeout "$SECONDS_DPDL" \
        $PY scripts/run_dpdl.py "$task" "$WORK/dpdl${SIZE}_${mode}_${task}_s${seed}_runs.csv" "$seed" 10 dpdl,dra "$EPOCHS" \
        > "$WORK/dpdl${SIZE}_${mode}_${task}_s${seed}.log" 2>&1 &
      pids+=($!)
    done
  done
done

has leads && log "4. leads L1 / L6 on $RODA_TASKS, seeds $RODA_SEEDS, one job per task (beside the others)"
has leads && for task in ${RODA_TASKS//,/ }; do
  name=${task//\//_}
  timeout "${SECONDS_LEADS:-480}" $PY scripts/run_roda_grid.py --profile real_full --data-root "$DATA" --tasks "$task" \
    --corruptions gaussian_noise,defocus_blur,brightness,contrast --seeds "$RODA_SEEDS" \
    --methods L1_eps_plan_spread,L6_semi_relaxed --variants "$($PY -c 'import json; from lib.experiments.roda_grid import DIAGNOSIS_LEADS as D; print(json.dumps({k: D[k] for k in ("L1_eps_plan_spread", "L6_semi_relaxed")}))')" \
    --bank-seed 0 --threads 2 --note "lead diagnosis on CUDA" --out "$WORK/leads_$name.csv" \
    --history "$WORK/leads_${name}_hist.csv" > "$WORK/leads_$name.log" 2>&1 &
  pids+=($!)
done

if has smoke; then
  log "2. RoDA methods on the smoke data, device auto (beside the DPDL jobs)"
  timeout "${SECONDS_GRID:-240}" $PY scripts/run_roda_grid.py --profile smoke --tasks synthetic \
    --corruptions gaussian_noise,defocus_blur,brightness,contrast \
    --methods patchcore,ttt++,ttac,roda,hungarian,continuous_ot,roda_robust,roda_robust_matched_slow \
    --variants '{"hungarian": {"method": "hungarian"}, "continuous_ot": {"method": "continuous_ot"}}' \
    --seeds 0 --threads 2 --out "$WORK/roda_smoke_cuda.csv" > "$WORK/roda_smoke.log" 2>&1
  log "grid rc=$?"
  grep -v "it/s\]" "$WORK/roda_smoke.log" | tail -20 >> "$OUT/log.txt"
fi

for pid in "${pids[@]}"; do wait "$pid"; done
log "background jobs done"
for f in "$WORK"/dpdl*.log "$WORK"/leads*.log; do [ -f "$f" ] || continue; echo "-- $f" >> "$OUT/log.txt"; grep -v "it/s\]" "$f" | tail -15 >> "$OUT/log.txt"; done
ls -la "$WORK" >> "$OUT/log.txt"
tar czf "$OUT/results.tgz" -C "$WORK" --exclude='*.pt' .
