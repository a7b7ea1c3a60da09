#!/usr/bin/env bash
# GPU check: a GPT-2 124M-shaped model (12 layers, 12 heads, 768 wide, 1024 context, 50304-row embedding)
# pretrained for a few hundred steps in bf16 on one GPU through the real pipeline (prep, tokenizer, shard,
# pretrain on DeepSpeed ZeRO-3, nccl). Prints tokens/s and MFU as JSON lines. Takes under 5 minutes on an
# A100/H100 class GPU.
#
#   bench/gpu_check.sh [STEPS] [MICRO_BATCH] [COMPILE] [OPTIMIZER]   (defaults 300, 16, false, adamw)
#   ZERO=1 bench/gpu_check.sh 300 16 true       (ZeRO stage; default 3)
#
# COMPILE (true or false) sets train.compile (torch.compile of the model inside the DeepSpeed engine). Under ZeRO-3
# DeepSpeed's per-module parameter hooks break the graph at every module, so compare with ZERO=1 too.
# OPTIMIZER: adamw or muon (train.optimizer). AdamW uses torch's fused CUDA kernel on a GPU.
#
# Needs a CUDA build of torch in .venv (setup.sh installs the CPU build; install the CUDA one for this check).
# MFU uses the data-sheet dense bf16 peak of the GPU (training/engine.py GPU_PEAK_BF16); 6N + attention FLOPs
# per token (PaLM appendix B).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${1:-300}
MICRO=${2:-16}
COMPILE=${3:-false}
OPTIMIZER=${4:-adamw}
ZERO=${ZERO:-3}
WORK=$(mktemp -d -t gpu-check-XXXX)
trap 'rm -rf "$WORK"' EXIT

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"

# nanoGPT's split of Tiny Shakespeare: first 90% of bytes train, last 10% val
"$PY" - "$WORK" <<'EOF'
import sys
from pathlib import Path
data = (Path("..") / "shared" / "data" / "tinyshakespeare" / "input.txt").read_bytes()
cut = int(len(data) * 0.9)
Path(sys.argv[1], "train.txt").write_bytes(data[:cut])
Path(sys.argv[1], "val.txt").write_bytes(data[cut:])
EOF

ARGS=(
  "workdir=$WORK/work" "data.inputs=[$WORK/train.txt]" "data.val_inputs=[$WORK/val.txt]"
  tokenizer.vocab_size=8192 model.vocab_size=50304
  model.n_layer=12 model.n_head=12 model.n_embd=768 model.block_size=1024
  train.micro_batch_size="$MICRO" train.grad_accum=1 train.max_steps="$STEPS" train.warmup_steps=30
  train.lr=6.0e-4 train.min_lr=6.0e-5 train.precision=bf16 train.zero_stage="$ZERO"
  train.compile="$COMPILE" train.optimizer="$OPTIMIZER"
  train.eval_every="$STEPS" train.eval_batches=5 train.log_every=25 train.sample_tokens=32
  train.checkpoint_every=100000
)
for stage in prep tokenizer shard; do
  .venv/bin/scratchgpt "$stage" bench/pretrain_shakespeare.yaml "${ARGS[@]}" > "$WORK/$stage.log" 2>&1
done
.venv/bin/scratchgpt pretrain bench/pretrain_shakespeare.yaml "${ARGS[@]}" 2> "$WORK/pretrain.err" \
  | tee "$WORK/pretrain.log" | grep -E '^\[pretrain\] step' >&2 || { tail -50 "$WORK/pretrain.err"; exit 1; }

"$PY" - "$WORK/work/pretrain/_COMPLETE.json" "$COMPILE" "$OPTIMIZER" "$ZERO" <<'EOF'
import json, sys
import torch
summary = json.load(open(sys.argv[1]))["summary"]
print(json.dumps({"figure": "gpu_gpt2_124m_tokens_per_sec", "tokens_per_sec": round(summary["tokens_per_sec"]),
                  "device": torch.cuda.get_device_name(0), "steps": summary["steps"], "compile": sys.argv[2],
                  "optimizer": sys.argv[3], "zero_stage": int(sys.argv[4]),
                  "precision": summary["precision"], "params": summary["params"]}))
print(json.dumps({"figure": "gpu_gpt2_124m_mfu", "mfu": round(summary["mfu"], 4),
                  "val_loss": round(summary["val_loss"], 4)}))
EOF
