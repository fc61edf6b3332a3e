#!/bin/bash
# One prepared GPU call (the device tool's H100/H200, ~6 min): copy warm-up variants side by side
# (benchmarks/warmup_sweep.py), then SFT of each on scripted K=2 trajectories, then
# teacher-forced scores and K=2 greedy rollouts of each. Every phase has its own time limit and
# a failed phase does not stop the next; logs, curves, rollouts and models land in $OUT.
#
# Carried (ignored paths): .whl (deepspeed, hjson, pydantic(+core), annotated-types,
# typing-inspection, bm25s, omegaconf: what the image lacks), .gpu (K1 and warm_all_idtype
# warm-up models (K1: J1 plus six 300/150 mqar_all/idlist cycles, docs/pretrain.md), b2.jsonl.gz
# = 1,800 scripted K=2 trajectories, held2.jsonl = 30 held-out ones).
# Plumbing check on the CPU: SKIP_SWEEP=1 with a finished sweep in $WORK/sweep, PY=.venv/bin/python.
set -u
OUT=${OUT:-/tmp/gpu_out}
W=${WORK:-/tmp/gw}
SWEEP_MIN=${SWEEP_MIN:-2.0}   # per warm-up variant, all running at once
SFT_MIN=${SFT_MIN:-1.8}       # sft.max_minutes of each SFT (a time box; the model is saved)
EVAL_S=${EVAL_S:-90}
mkdir -p "$OUT" "$W"
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 WANDB_MODE=offline MEMACT_THREADS=1 OMP_NUM_THREADS=1
PY=${PY:-python3}
if [ -d .whl ] && ! $PY -c "import deepspeed" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
T0=$(date +%s)
t() { echo "[gpu] $(( $(date +%s) - T0 ))s: $*"; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch, transformers, deepspeed, memact; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)" 2>&1 | grep -v WARN
} | tee -a "$OUT/summary.txt"

# ---- phase 1: warm-up variants, all at once on the one device
t "sweep (limit ${SWEEP_MIN} min per variant)"
C300="mqar_all:300:4:4:128:all,idlist:150:1:4:128:targets"
C16="mqar_all:300:4:16:128:all,idlist:150:1:16:128:targets"
[ -n "${SKIP_SWEEP:-}" ] || $PY benchmarks/warmup_sweep.py --out "$W/sweep" --minutes "$SWEEP_MIN" \
  "mixcK1=.gpu/K1|(idlist_mqar:400:1:16:128:copy)*40" \
  "cycK1=.gpu/K1|($C300)*40,mqar_all:600:4:4:128:all" \
  "cycK1b16=.gpu/K1|($C16)*40,mqar_all:600:4:16:128:all" \
  "mixcA=.gpu/warm_all_idtype|(idlist_mqar:400:1:16:128:copy)*40" 2>&1 | tee -a "$OUT/summary.txt"

# ---- phase 2: SFT of every variant that saved a model
t "sft"
[ -f "$W/b2.jsonl" ] || gunzip -c .gpu/b2.jsonl.gz > "$W/b2.jsonl"
BEST=$($PY - "$W/sweep/summary.json" <<'EOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r.get("saved")]
score = lambda r: r["saved"]["acc"].get("mqar_all/recall", 0) * r["saved"]["acc"].get("idlist1/copy", 0)
print(" ".join(r["name"] for r in sorted(rows, key=score, reverse=True)[:4]))
EOF
)
if [ -z "$BEST" ]; then  # no variant saved a model: still check SFT and rollouts on the device, from K1
  mkdir -p "$W/sweep/K1" && cp -r .gpu/K1 "$W/sweep/K1/model" && BEST=K1
fi
t "best: $BEST"
for v in $BEST; do
  timeout 300 $PY -m memact.cli sft --data "$W/b2.jsonl" --out "$W/sft_$v" "model.path=$W/sweep/$v/model" \
    sft.epochs=1 optim.lr=1e-3 optim.schedule=cosine optim.warmup_steps=50 sft.segments_per_step=2 \
    "sft.max_minutes=$SFT_MIN" logging.progress=false > "$W/sft_$v.log" 2>&1 &
  sleep 3
done
wait
for v in $BEST; do tail -n 3 "$W/sft_$v.log"; done | grep -v WARN | tee -a "$OUT/summary.txt"

# ---- phase 3: teacher-forced scores and K=2 greedy rollouts
t "eval"
for v in $BEST; do
  [ -f "$W/sft_$v/config.json" ] || continue
  timeout "$EVAL_S" $PY benchmarks/teacher_forced.py --policy "$W/sft_$v" --data .gpu/held2.jsonl \
    > "$W/tf_$v.txt" 2>&1 &
  timeout "$EVAL_S" $PY -m memact.cli rollout --policy "$W/sft_$v" -k 2 --n 32 --seed 7 --temperature 0 \
    --out "$W/roll_$v.jsonl" --quiet > "$W/roll_$v.txt" 2>&1 &
  sleep 3
done
wait
for v in $BEST; do echo "== $v"; cat "$W/tf_$v.txt" "$W/roll_$v.txt" 2>/dev/null | grep -v "Loading\|WARN"; done | tee -a "$OUT/summary.txt"

# ---- what comes back (at most 8 files of 16 MiB)
t "packing"
(cd "$W" && tar czf "$OUT/logs.tar.gz" --exclude=model --exclude=init --exclude='*.partial' sweep/*.log sweep/*/curve.jsonl \
  sweep/*/result.json sweep/summary.json sft_*.log tf_*.txt roll_*.txt roll_*.jsonl 2>/dev/null)
(cd "$W" && tar cf - --exclude='*.pt' --exclude=checkpoints sft_* | split -b 15m - "$OUT/sft_models.tar.part-")
(cd "$W" && tar cf - sweep/*/model | split -b 15m - "$OUT/warm_models.tar.part-")
ls -la "$OUT"
t "done"
