#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent machine (device tool) with this checkout (the model and data it
# needs are bundled in lora_lens/data). Prints: the CUDA tests (tests/test_cuda.py, then the finder's and
# decompose's tests there), the range finder on CUDA vs the svd_lowrank loop and vs lora_lens on the CPU
# (bench_finder.py), adapter spectra GPU vs CPU (bench_spectra.py), and the collection kernel on CUDA
# (bench_collection.py). Each step has its own time limit, so one slow step does not hide the others.
#
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu.log
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=${PYTHON:-python3}
step() { echo; echo "=== $1 ($(date +%T))"; shift; timeout "$@"; echo "--- exit $?"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0), torch.get_num_threads(), 'CPU threads')"
step "CUDA tests" 150 $PY -m pytest -q -p no:cacheprovider -x tests/test_cuda.py tests/test_randomized.py tests/test_decompose.py
step "range finder on CUDA" 240 $PY benchmarks/bench_finder.py --device cuda --cpu-too --threads 16 --repeats 2 \
    --whole-base --layers 4 --base-dir /tmp
step "adapter spectra GPU vs CPU" 60 $PY benchmarks/bench_spectra.py --threads 16 --repeat 3 --no-cli --no-naive
step "collection kernel on CUDA" 90 $PY benchmarks/bench_collection.py --device cuda --n 10,50,200 --layers 1 --threads 16
