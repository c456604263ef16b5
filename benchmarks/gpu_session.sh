#!/usr/bin/env bash
# One device-tool call = one batch of GPU work. Usage (on the GPU machine, repo root):
#   bash benchmarks/gpu_session.sh kernels      # correctness at real sizes + kernel benchmarks
#   bash benchmarks/gpu_session.sh models       # batch-split and fused-linear benchmarks
#   bash benchmarks/gpu_session.sh kernels2     # selective CE (flat grid, floors) + fused LM head, GPU tests
#   bash benchmarks/gpu_session.sh kernels3     # adopted flat backward at real sizes, Pallas flat, fused LM head
#   bash benchmarks/gpu_session.sh final        # batch split (torch, 60 steps) + fused LM head diagnostics
#   bash benchmarks/gpu_session.sh verify       # adopted defaults: selective CE (+ torch.compile), fused LM heads
#   bash benchmarks/gpu_session.sh review       # scoring-stream refactor re-checked and re-timed
#   bash benchmarks/gpu_session.sh routers      # batch split with routers of 1, 2 and 4 layers
#   bash benchmarks/gpu_session.sh chunked      # fused LM head: forward in vocabulary blocks, with a profile
#   bash benchmarks/gpu_session.sh chunked2     # + in-place backward accumulator, launch variants, floors
#   bash benchmarks/gpu_session.sh timeline     # fused LM head: wall time per call, host time, profile gaps
#   bash benchmarks/gpu_session.sh final3a      # both vocabulary-block forwards: GPU tests + fused LM head benches
#   bash benchmarks/gpu_session.sh final3b      # batch splitting (both frameworks) with the new router head
#   bash benchmarks/gpu_session.sh jaxdiag      # JAX fused LM head: forward alone, statistics, GEMMs
# Logs and JSON go to $OUT (or ./out/gpu). Carried wheels in .whl/ (liger-kernel, cut-cross-entropy) are
# installed into /tmp/site first; nothing is fetched from a registry.
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset TRITON_INTERPRET JAX_PLATFORMS
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name rc=$rc"
}
# Only 8 files come back from a device call: the device line goes to stdout, not to a file.
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, triton, jax, flax, optax; print('torch', torch.__version__, 'triton', triton.__version__, 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"
case "${1:-kernels}" in
  kernels)
    step gpu_check_torch 120 python3 benchmarks/gpu_check_torch.py
    step gpu_check_jax 110 python3 benchmarks/gpu_check_jax.py
    step pytest_gpu_torch 50 python3 -m pytest -q -x -m gpu tests/torch -p no:cacheprovider
    # torch: one log + one JSON for the three kernel benchmarks (scoring and selective-CE JSON embedded in
    # bench_torch.json; the log's tail repeats the three summaries)
    step bench_torch 150 bash -c 'python3 benchmarks/bench_scoring_torch.py --out /tmp/bench_scoring_torch.json; python3 benchmarks/bench_selective_ce_torch.py --out /tmp/bench_selective_ce_torch.json; python3 benchmarks/bench_selection_torch.py --include-json /tmp/bench_scoring_torch.json /tmp/bench_selective_ce_torch.json --out "$0/bench_torch.json"' "$OUT"
    # jax: one log + one JSON for both benchmarks (the scoring JSON is embedded in bench_jax.json; the log's
    # tail repeats both summaries, ending with the best launches as ready LaunchDefaults lines)
    step bench_jax 160 bash -c 'python3 benchmarks/bench_scoring_jax.py --out /tmp/bench_scoring_jax.json; python3 benchmarks/bench_selective_ce_jax.py --scoring-json /tmp/bench_scoring_jax.json --out "$0/bench_jax.json"' "$OUT"
    ;;
  models)
    step bench_batch_split_torch 200 python3 benchmarks/bench_batch_split_torch.py --batch-size 64 --router-path auto,logits --out "$OUT/bench_batch_split_torch.json"
    step bench_batch_split_jax 200 python3 benchmarks/bench_batch_split_jax.py --batch-size 64 --router-path auto,logits --out "$OUT/bench_batch_split_jax.json"
    step bench_fused_linear_torch 80 python3 benchmarks/bench_fused_linear_torch.py --out "$OUT/bench_fused_linear_torch.json"
    step bench_fused_linear_jax 80 python3 benchmarks/bench_fused_linear_jax.py --out "$OUT/bench_fused_linear_jax.json"
    ;;
  kernels2)
    # Round 2 (session 2): the fused LM head's in-place gradient kernel, the flat backward grid, the floors.
    step pytest_gpu_torch 120 bash -c 'python3 -m pytest -q -x -p no:cacheprovider tests/torch/test_kernel_fused_linear.py tests/torch/test_kernel_cross_entropy.py && python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/torch'
    step bench_selective_ce_torch 170 python3 benchmarks/bench_selective_ce_torch.py --out "$OUT/bench_selective_ce_torch.json"
    step bench_fused_linear_torch 170 python3 benchmarks/bench_fused_linear_torch.py --out "$OUT/bench_fused_linear_torch.json"
    ;;
  kernels3)
    # Round 3 (session 2): the adopted flat Triton backward verified at real sizes, the Pallas flat variant,
    # the fused LM head after the memory fix with its forward GEMM diagnostics.
    step gpu_check_torch 130 python3 benchmarks/gpu_check_torch.py
    step pytest_gpu 120 bash -c 'python3 -m pytest -q -x -p no:cacheprovider tests/torch/test_kernel_cross_entropy.py tests/torch/test_kernel_fused_linear.py && JAX_PLATFORMS=cuda python3 -m pytest -q -x -p no:cacheprovider tests/jax/test_kernel_cross_entropy.py'
    step bench_selective_ce_torch 100 python3 benchmarks/bench_selective_ce_torch.py --no-sweep --out "$OUT/bench_selective_ce_torch.json"
    step bench_selective_ce_jax 130 python3 benchmarks/bench_selective_ce_jax.py --out "$OUT/bench_selective_ce_jax.json"
    step bench_fused_linear_torch 100 python3 benchmarks/bench_fused_linear_torch.py --budgets 0.5 --out "$OUT/bench_fused_linear_torch.json"
    ;;
  routers)
    # The fused LM head after the wide-program scoring launch (both frameworks), and the router depth sweep
    # of the batch-split benchmark (what a shallower router buys against random_sequence).
    step bench_fused_linear_torch 90 python3 benchmarks/bench_fused_linear_torch.py --budgets 0.5 --out "$OUT/bench_fused_linear_torch.json"
    step bench_fused_linear_jax 100 python3 benchmarks/bench_fused_linear_jax.py --out "$OUT/bench_fused_linear_jax.json"
    step bench_batch_split_torch 140 python3 benchmarks/bench_batch_split_torch.py --batch-size 64 --router-layers 1,2,4 --router-path auto --out "$OUT/bench_batch_split_torch.json"
    step bench_batch_split_jax 210 python3 benchmarks/bench_batch_split_jax.py --batch-size 64 --router-layers 2,4 --router-path auto --out "$OUT/bench_batch_split_jax.json"
    ;;
  final)
    # Session 2, last call: the PyTorch batch split with 3x the timed steps (its small-batch steps are noisy),
    # and the fused LM head with the statistics-kernel diagnostics.
    step bench_batch_split_torch 200 python3 benchmarks/bench_batch_split_torch.py --batch-size 64 --router-layers 2,4 --router-path auto --warmup 10 --steps 60 --out "$OUT/bench_batch_split_torch.json"
    step bench_fused_linear_torch 120 python3 benchmarks/bench_fused_linear_torch.py --budgets 0.5 --out "$OUT/bench_fused_linear_torch.json"
    ;;
  verify)
    # Session 2, verification of the adopted defaults: selective CE with the torch.compile baseline in the
    # same run, both fused LM heads with the few-row scoring launch.
    step bench_selective_ce_torch 220 python3 benchmarks/bench_selective_ce_torch.py --no-sweep --compile --out "$OUT/bench_selective_ce_torch.json"
    step bench_fused_linear_torch 110 python3 benchmarks/bench_fused_linear_torch.py --budgets 0.5 --out "$OUT/bench_fused_linear_torch.json"
    step bench_fused_linear_jax 110 python3 benchmarks/bench_fused_linear_jax.py --out "$OUT/bench_fused_linear_jax.json"
    ;;
  review)
    # Session 2, after the review refactor of the scoring stream (one shared rescale-and-accumulate helper):
    # correctness at real sizes and the timings that depend on the scoring kernel, re-measured.
    step gpu_check_torch 130 python3 benchmarks/gpu_check_torch.py
    step pytest_gpu_torch 90 python3 -m pytest -q -x -p no:cacheprovider tests/torch/test_kernel_scoring.py tests/torch/test_kernel_fused_linear.py tests/torch/test_kernel_cross_entropy.py
    step bench_scoring_torch 90 python3 benchmarks/bench_scoring_torch.py --no-sweep --out "$OUT/bench_scoring_torch.json"
    step bench_selective_ce_torch 100 python3 benchmarks/bench_selective_ce_torch.py --no-sweep --out "$OUT/bench_selective_ce_torch.json"
    step bench_fused_linear_torch 100 python3 benchmarks/bench_fused_linear_torch.py --budgets --out "$OUT/bench_fused_linear_torch.json"
    ;;
  chunked)
    # Session 3: the fused LM head's forward in vocabulary blocks of all rows (chunked statistics launches):
    # GPU tests of the kernels and the fused loss, then the benchmark with a profiler breakdown.
    step pytest_gpu_torch 200 python3 -m pytest -q -x -p no:cacheprovider tests/torch/test_kernel_scoring.py tests/torch/test_kernel_fused_linear.py tests/torch/test_fused_linear.py
    step bench_fused_linear_torch 200 python3 benchmarks/bench_fused_linear_torch.py --budgets 0.5 --forward-columns 4096 6144 --profile --out "$OUT/bench_fused_linear_torch.json"
    ;;
  chunked2)
    # Session 3, second call: the in-place float32 accumulator of the backward, statistics-launch variants,
    # and the floors of every part measured in the same run.
    step pytest_gpu_torch 150 python3 -m pytest -q -x -p no:cacheprovider tests/torch/test_kernel_fused_linear.py tests/torch/test_fused_linear.py
    step bench_fused_linear_torch 220 python3 benchmarks/bench_fused_linear_torch.py --budgets 0.5 --profile --out "$OUT/bench_fused_linear_torch.json"
    ;;
  timeline)
    # Session 3: where the fused LM head's wall time goes beyond its kernels (GPU idle gaps in a profile).
    step bench_fused_linear_torch 120 python3 benchmarks/bench_fused_linear_torch.py --budgets --methods cggr_fused liger_flce matmul --profile --out "$OUT/bench_fused_linear_torch.json"
    ;;
  final3a)
    # Session 3, verification of both vocabulary-block forwards: compiled tests of both frameworks, then the
    # fused LM head benchmarks (PyTorch with the floors, JAX against XLA + optax).
    step pytest_gpu 230 bash -c 'python3 -m pytest -q -x -p no:cacheprovider tests/torch/test_kernel_scoring.py tests/torch/test_kernel_fused_linear.py tests/torch/test_fused_linear.py && JAX_PLATFORMS=cuda python3 -m pytest -q -x -p no:cacheprovider tests/jax/test_kernel_scoring.py tests/jax/test_fused_linear.py'
    step bench_fused_linear_torch 150 python3 benchmarks/bench_fused_linear_torch.py --budgets 0.5 --out "$OUT/bench_fused_linear_torch.json"
    step bench_fused_linear_jax 150 python3 benchmarks/bench_fused_linear_jax.py --out "$OUT/bench_fused_linear_jax.json"
    ;;
  final3b)
    # Session 3: batch splitting with the routers' LM head scored in vocabulary blocks (both frameworks),
    # after the JAX fused-linear GPU tests (re-run after a tolerance fix).
    step pytest_gpu_jax 140 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider tests/jax/test_kernel_scoring.py tests/jax/test_fused_linear.py
    step bench_batch_split_torch 200 python3 benchmarks/bench_batch_split_torch.py --batch-size 64 --router-layers 2,4 --router-path auto --warmup 10 --steps 60 --out "$OUT/bench_batch_split_torch.json"
    step bench_batch_split_jax 230 python3 benchmarks/bench_batch_split_jax.py --batch-size 64 --router-layers 2,4 --router-path auto --out "$OUT/bench_batch_split_jax.json"
    ;;
  jaxdiag)
    # Session 3: where the JAX fused LM head's time goes (forward alone, its statistics, its GEMMs).
    step bench_fused_linear_jax 200 python3 benchmarks/bench_fused_linear_jax.py --budgets --row-blocks 0 --methods cggr_fused matmul --diagnostics --out "$OUT/bench_fused_linear_jax.json"
    ;;
  quality1|quality2)
    # The study reads the corpora from $CGGR_DATA_DIR (carry a copy of shared/data as .data/); its many
    # outputs travel back as one archive.
    export CGGR_DATA_DIR=${CGGR_DATA_DIR:-$PWD/.data}
    Q=out/quality-gpu
    if [ "$1" = quality1 ]; then
      step quality_torch_main 560 python3 -m benchmarks.quality.run --scale gpu --frameworks torch --modes main \
        --budget flops --out $Q --deadline-min 6.5 --no-progress
    else
      step quality_jax_main 330 python3 -m benchmarks.quality.run --scale gpu --frameworks jax --modes main \
        --budget flops --out $Q --deadline-min 4.5 --no-progress
      step quality_torch_ablations 230 python3 -m benchmarks.quality.run --scale gpu --frameworks torch \
        --modes ablations --seeds 0,1 --steps 150 --out $Q --deadline-min 3 --no-progress
    fi
    tar czf "$OUT/$1.tgz" --exclude=cache -C out quality-gpu
    ;;
  *) echo "unknown session ${1}"; exit 2;;
esac
