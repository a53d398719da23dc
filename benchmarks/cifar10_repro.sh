#!/usr/bin/env bash
# Small-scale reproduction of ARM's claim on real data (CIFAR-10): AR-pretrain arm_mamba_tiny on the training images
# without labels, fine-tune it with timm's train.py, and train the same model from scratch with the same budget.
#   bash benchmarks/cifar10_repro.sh TRAIN_PY CIFAR_TARBALL_DIR OUT_DIR [PRETRAIN_EPOCHS] [FINETUNE_EPOCHS]
# TRAIN_PY: timm's train.py (from timm's GitHub repository); CIFAR_TARBALL_DIR holds train.tar.gz and test.tar.gz.
# The two fine-tuning runs share the GPU (they are small); each writes OUT_DIR/ft/<name>/summary.csv.
set -euo pipefail
train_py=$1; tarballs=$2; out=$3; pt_epochs=${4:-8}; ft_epochs=${5:-10}
data=$out/cifar10
mkdir -p "$data"
tar -xzf "$tarballs/train.tar.gz" -C "$data"
tar -xzf "$tarballs/test.tar.gz" -C "$data"

python3 -m timm_arm.pretrain -c recipes/pretrain/arm_mamba_tiny_cifar10.yaml --data-dir "$data" --output "$out/pt" \
    --epochs "$pt_epochs" --warmup-epochs 1 --workers 14 --no-progress
[ -f "$out/pt/export/model.safetensors" ] || python3 -m timm_arm.pretrain --output "$out/pt" --export "$out/pt/export"

python3 "$train_py" --config recipes/finetune/arm_mamba_tiny_cifar10.yaml --data-dir "$data" \
    --pretrained-path "$out/pt/export/model.safetensors" --output "$out/ft" --experiment arm_pretrained \
    --epochs "$ft_epochs" --warmup-epochs 1 --workers 7 > "$out/ft_pretrained.log" 2>&1 &
python3 "$train_py" --config recipes/finetune/arm_mamba_tiny_cifar10_scratch.yaml --data-dir "$data" \
    --output "$out/ft" --experiment scratch --epochs "$ft_epochs" --warmup-epochs 1 --workers 7 \
    > "$out/ft_scratch.log" 2>&1 &
wait
for run in arm_pretrained scratch; do
    echo "== $run: best eval top-1 over epochs"
    python3 -c "import csv,sys; r=list(csv.DictReader(open(sys.argv[1]))); b=max(r,key=lambda x: float(x['eval_top1'])); print(f\"epochs {len(r)}, best top-1 {float(b['eval_top1']):.2f} (epoch {b['epoch']}), last {float(r[-1]['eval_top1']):.2f}\")" "$out/ft/$run/summary.csv"
done
