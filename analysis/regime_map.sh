#!/usr/bin/env bash
# Issue 30's regime map: every run of docs/results/2026-12-07-regime-map.md, in the order they ran.
# Resumable: each `decoupled bench` reuses the rows and seeds that already finished in its --out folder
# (Note [finished rows]), so rerunning this script after a cut goes on where it stopped.
# Needs root (network namespaces) and ../shared/data/FashionMNIST/raw. Usage: analysis/regime_map.sh [OUT] [NET...]
set -euo pipefail
OUT=${1:-runs/regime2}; shift || true
NETS=${*:-mlp vgg vit}
export OMP_NUM_THREADS=1
declare -A TARGET=([mlp]=0.80 [vgg]=0.80 [vit]=0.75)      # fixed in each config's header before any run
# The budget (the page's "What was cut"): 3 seeds on the MLP, where issue 30's goals are judged; one on
# the VGG and the ViT.
declare -A SEEDS=([mlp]=3 [vgg]=1 [vit]=1)
declare -A EVAL=([mlp]="--eval-every-steps 40" [vgg]="--eval-every-steps 80 --eval-subset 5000"
                 [vit]="--eval-every-steps 80 --eval-subset 5000")
chosen() {  # the tuned value of a row's knob: its tuning record under the curves' folder (OUT/<link>/tune)
  python -c "import json,sys,pathlib; print(json.loads(next(pathlib.Path(sys.argv[1]).rglob('tune/' + sys.argv[2])).read_text())['chosen'])" "$1" "$2"
}
for net in $NETS; do
  C=launch/configs/regime_${net}_fashion_mnist.toml; O=$OUT/$net
  B=(decoupled bench --config "$C" --ranks 2 --nodes 2)
  CURVE=(--curve --seeds "${SEEDS[$net]}" --target-acc "${TARGET[$net]}" ${EVAL[$net]})
  # 1. the unshaped curves; every row trains on the same 90 % (the tuned rows hold 10 % out)
  "${B[@]}" --link loopback "${CURVE[@]}" --set data.val_fraction=0.1 --microbatches 4 \
      --rows e2e,sync,sync-int8,async,ddp,fsdp,1f1b --out "$O/curves"
  "${B[@]}" --link loopback "${CURVE[@]}" --rows ddp-powersgd --tune powersgd-rank=1,4,16 --out "$O/curves-powersgd"
  "${B[@]}" --link loopback "${CURVE[@]}" --rows localsgd --tune localsgd-period=4,16,64 --out "$O/curves-localsgd"
  R=$(chosen "$O/curves-powersgd" ddp-powersgd.json); P=$(chosen "$O/curves-localsgd" localsgd.json)
  # 2. a throughput probe per row and link (60 steps: a warm-up epoch and 2 timed ones of 20), tuned knobs
  "${B[@]}" --link loopback,1gbit,100mbit --set data.limit_train=1280 --set data.val_fraction=0.1 --repeats 2 \
      --powersgd-rank "$R" --localsgd-period "$P" \
      --rows sync,sync-int8,async,ddp,ddp-powersgd,localsgd,fsdp,1f1b --out "$O/probes"
  # 3. async depends on timing: its full curves on every shaped link
  "${B[@]}" --link 1gbit,100mbit "${CURVE[@]}" --set data.val_fraction=0.1 --rows async --out "$O/shaped"
done
