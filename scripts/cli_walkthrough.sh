#!/usr/bin/env bash
# The three-command walkthrough of README.md and docs/cli.md, tried end to end on a real MVTec category with a simulated camera
# change, labels read only by `roda evaluate` at the end. Usage (from the repository root):
#
#   bash scripts/cli_walkthrough.sh ../shared/data/mvtec/bottle gaussian_noise 3 [OUT_TXT]
#
# NEW/ = the category's test images (MVTec layout, masks kept for `evaluate`) under CORRUPTION at SEVERITY,
# written with lib.common.corruptions.corrupt (seed 0) to a temporary folder. Runs: fit; adapt with the default
# RoDA; adapt with --bn-init matched --epochs 0 (the statistics alone); score; evaluate clean, shifted with
# the source encoder, and shifted after each adaptation. The transcript (commands, times, AUROCs) goes to
# OUT_TXT (default benchmarks/results/cli_walkthrough_<category>_<corruption><severity>.txt).
# VARIANTS="roda_robust_matched_slow ..." adds `adapt --variant NAME` runs (and their evaluation);
# LITERAL=0 leaves out the default RoDA adapt.
set -euo pipefail
CAT=${1:?category folder (MVTec layout)}; CORR=${2:-gaussian_noise}; SEV=${3:-3}
NAME=$(basename "$CAT")
OUT=${4:-benchmarks/results/cli_walkthrough_${NAME}_${CORR}${SEV}.txt}
RODA=${RODA:-.venv/bin/roda}; PY=${PY:-.venv/bin/python}; VARIANTS=${VARIANTS:-}; LITERAL=${LITERAL:-1}
WORK=$(mktemp -d); TMP_OUT="$OUT.partial"; trap 'rm -rf "$WORK" "$TMP_OUT"' EXIT
NEW="$WORK/$NAME"
"$PY" - "$CAT" "$NEW" "$CORR" "$SEV" <<'PYEOF'
import shutil, sys
from pathlib import Path
import numpy as np
from PIL import Image
from lib.common.corruptions import corrupt
src, dst, name, sev = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
for p in sorted((src / "test").rglob("*.png")):
    q = dst / p.relative_to(src)
    q.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(corrupt(np.asarray(Image.open(p).convert("RGB")), name, sev, seed=0)).save(q)
shutil.copytree(src / "ground_truth", dst / "ground_truth")
PYEOF
: > "$TMP_OUT"
step() {  # step LABEL CMD...: run, append the command, its last lines and its wall time to the transcript
  local label=$1; shift; local t0=$SECONDS
  echo "\$ ${*//$WORK/NEW_PARENT}" >> "$TMP_OUT"
  "$@" -q 2>&1 | tail -n 4 | sed "s|$WORK|NEW_PARENT|g" >> "$TMP_OUT"
  echo "# $label: $((SECONDS - t0)) s" >> "$TMP_OUT"
}
echo "# $(date -u +%F) $(git rev-parse --short HEAD) $NAME: NEW = test images under $CORR severity $SEV" >> "$TMP_OUT"
step fit            "$RODA" fit "$CAT/train/good" -o "$WORK/bank.pt"
[ "$LITERAL" = 1 ] && step adapt_roda "$RODA" adapt "$WORK/bank.pt" "$NEW/test" -o "$WORK/roda.pt"
for v in $VARIANTS; do step "adapt_$v" "$RODA" adapt "$WORK/bank.pt" "$NEW/test" --variant "$v" -o "$WORK/$v.pt"; done
step adapt_matched  "$RODA" adapt "$WORK/bank.pt" "$NEW/test" --bn-init matched --epochs 0 -o "$WORK/matched.pt"
step score          "$RODA" score "$WORK/bank.pt" "$NEW/test" --state "$WORK/matched.pt" -o "$WORK/scores"
echo "# scores.csv rows: $(($(wc -l < "$WORK/scores/scores.csv") - 1)), maps: $(find "$WORK/scores/maps" -name '*.png' | wc -l)" >> "$TMP_OUT"
step eval_clean     "$RODA" evaluate "$WORK/bank.pt" "$CAT"
step eval_source    "$RODA" evaluate "$WORK/bank.pt" "$NEW"
[ "$LITERAL" = 1 ] && step eval_roda "$RODA" evaluate "$WORK/bank.pt" "$NEW" --state "$WORK/roda.pt"
for v in $VARIANTS; do step "eval_$v" "$RODA" evaluate "$WORK/bank.pt" "$NEW" --state "$WORK/$v.pt"; done
step eval_matched   "$RODA" evaluate "$WORK/bank.pt" "$NEW" --state "$WORK/matched.pt"
mv "$TMP_OUT" "$OUT"; echo "$OUT"
