#!/usr/bin/env bash
# Issue 32's validation (docs/results/2026-12-07-plan-validation.md): for each network of the regime map,
# one short measurement on a quiet machine freezes the plan (plan.json: its constants), then
# `decoupled report` joins it with the map's probes, run before it (analysis/regime_map.sh). Nothing
# is fitted to the probes. The plan is told the layout and knobs the probes ran: the bench's even split
# (dist.placement), the tuned PowerSGD rank and local-SGD period, and the pipelines' microbatch sweep. Usage: analysis/plan_validation.sh [OUT]
set -euo pipefail
OUT=${1:-runs/regime2}
export OMP_NUM_THREADS=1
declare -A SPLIT=([mlp]="[2,2]" [vgg]="[2,1]" [vit]="[2,2]")  # the probes' stages.json
for net in mlp vgg vit; do
  P=$OUT/$net/probes
  decoupled plan --config "launch/configs/regime_${net}_fashion_mnist.toml" --set "dist.placement=${SPLIT[$net]}" \
      --ranks 2 --nodes 2 --link loopback,1gbit,100mbit --powersgd-rank 16 --localsgd-period 4 --microbatches 2,4,8 \
      --methods sync,sync-int8,async,ddp,ddp-powersgd,localsgd,fsdp,1f1b --out "$OUT/plan/$net"
  decoupled report "$OUT/plan/$net" "$P/loopback" "$P/1gbit" "$P/100mbit" --out "$OUT/plan/$net-vs-bench"
done
