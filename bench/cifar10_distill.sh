#!/usr/bin/env bash
# The CIFAR-10 distillation table of docs/results.md, one run at a time (never two at once:
# on a small CPU they slow each other 5-10x). Usage: bench/cifar10_distill.sh [ROW ...] where a
# row is a config name of configs/cifar10-distill (student, kd, ...); default: every row.
# Finished runs are skipped, so the script can be rerun after an interruption; the teacher
# (configs/cifar10-distill/teacher.yaml, then teacher-r2.yaml and teacher-r3.yaml:
# runs/c10-teacher-resnet56-r3, 88.05% test top-1)
# must exist first.
set -euo pipefail
cd "$(dirname "$0")/.."
TLKD=${TLKD:-.venv/bin/tlkd}
SEEDS=${SEEDS:-"0 1"}
ROWS=${*:-"student kd hard fitnet at dkd dist kd-ls dkd-ls rkd pkt sp crd reviewkd function-matching vit-alone vit-token"}
for row in $ROWS; do
  for seed in $SEEDS; do
    case $row in
      student) exp=c10-resnet20-alone-s$seed; mode=finetune ;;
      vit-alone) exp=c10-vit-alone-s$seed; mode=finetune ;;
      vit-token) exp=c10-vit-token-s$seed; mode=distill ;;
      function-matching) exp=c10-resnet20-fm-s$seed; mode=distill ;;
      *) exp=c10-resnet20-$row-s$seed; mode=distill ;;
    esac
    if grep -qs '"status": "finished"' "runs/$exp/summary.json"; then
      echo "skip $exp (finished)"; continue
    fi
    echo "run  $exp  $(date -u +%H:%M:%S)"
    if [ -f "runs/$exp/checkpoint.pt" ]; then
      "$TLKD" "$mode" --resume "runs/$exp" -q
    else
      "$TLKD" "$mode" "configs/cifar10-distill/$row.yaml" "seed=$seed" "experiment=$exp" -q
    fi
  done
done
