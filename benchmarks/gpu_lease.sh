#!/usr/bin/env bash
# Both GPU benchmarks in one go, for a short lease of a GPU machine without internet (the H100/H200 machines
# lent to some sessions: torch, transformers, peft and pandas installed; no trl or datasets):
#   1. bench_vs_trl.py --preset gpu: sftlab vs TRL+PEFT, LoRA / full / DPO on a Qwen2-0.5B shape, bf16, 8 x 2048;
#   2. bench_memory.py --preset gpu: QLoRA of the 7B shape on 2048-token rows, and the 70B shape's NF4 load.
# The random 7B and 70B (sparse) models are written in the background, at the lowest CPU priority, while (1)
# runs on the GPU. Each part has a deadline, so that a slow part leaves the others their time; logs and result
# files go to $OUT (default /tmp/gpu-out).
#
# Wheels: where trl/datasets are missing, put them in .whl/ first (CPython 3.12, manylinux x86_64):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 -d .whl trl==1.16.0 datasets==5.2.0 pyarrow==26.0.1 dill==0.4.1 \
#         multiprocess==0.70.19 fsspec==2026.9.0 torchao==0.18.0
#
#     bash benchmarks/gpu_lease.sh            # VS_TRL_S=330 MEMORY_S=240 TOTAL_S=570 by default (seconds)
#     PYTHON=.venv/bin/python VS_TRL_ARGS="--device cpu --smoke" MEMORY_PRESET=gpu-dry SHAPES=tiny \
#         bash benchmarks/gpu_lease.sh        # the same steps, tiny, on a CPU (a check of the script)
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SFTLAB_BENCH_CACHE="${SFTLAB_BENCH_CACHE:-/tmp/sftlab-bench-models}"
PYTHON="${PYTHON:-python3}"
began=$(date +%s)
elapsed() { echo $(( $(date +%s) - began )); }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    nproc; free -g | head -2; df -h /tmp | tail -1
    "$PYTHON" -c "import pyarrow; print('pyarrow (image)', pyarrow.__version__)" 2>&1
} > "$OUT/machine.txt" 2>&1
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade .whl/*.whl >> "$OUT/machine.txt" 2>&1 || echo "wheel install failed" >> "$OUT/machine.txt"
fi
"$PYTHON" - >> "$OUT/machine.txt" 2>&1 <<'EOF'
import importlib, torch
for name in ("torch", "transformers", "peft", "trl", "datasets", "torchao", "accelerate", "pyarrow"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:
        print(name, "MISSING:", type(error).__name__, error)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
cat "$OUT/machine.txt"
echo "[$(elapsed) s] set up"

# The big random models, written while the GPU runs (1): nice'd, so the timed runs keep their CPUs.
nice -n 19 timeout "${TOTAL_S:-570}" "$PYTHON" - ${SHAPES:-7B 70B} > "$OUT/models.log" 2>&1 <<'EOF' &
import sys, time
sys.path.insert(0, "benchmarks")
import bench_memory
trained, loaded = (sys.argv[1:] * 2)[:2]
for name, write in ((trained, bench_memory.write_model), (loaded, bench_memory.write_sparse_model)):
    started = time.time()
    write(name)
    print(f"{name} written in {time.time() - started:.0f} s", flush=True)
EOF
writer=$!

timeout --kill-after=10 "${VS_TRL_S:-330}" "$PYTHON" benchmarks/bench_vs_trl.py --preset gpu ${VS_TRL_ARGS:-} --keep-runs \
    --cache-dir /tmp/sftlab-bench-vs-trl --output "$OUT/bench_vs_trl.json" 2>&1 | tee "$OUT/vs_trl.log"
echo "[$(elapsed) s] bench_vs_trl exit ${PIPESTATUS[0]}"
(cd /tmp/sftlab-bench-vs-trl && tar -czf "$OUT/vs_trl_runs.tgz" runs-*/*.log 2>/dev/null)

wait "$writer"
echo "[$(elapsed) s] models: $(tr '\n' ' ' < "$OUT/models.log")"
left=$(( ${TOTAL_S:-570} - $(elapsed) ))  # what the whole script may still take
memory_s=$(( left < ${MEMORY_S:-240} ? left : ${MEMORY_S:-240} ))
timeout --kill-after=10 "$(( memory_s > 30 ? memory_s : 30 ))" "$PYTHON" benchmarks/bench_memory.py --preset "${MEMORY_PRESET:-gpu}" 2>&1 | tee "$OUT/memory.log"
echo "[$(elapsed) s] bench_memory exit ${PIPESTATUS[0]}"
