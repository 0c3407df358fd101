#!/usr/bin/env bash
# Everything that needs a GPU, in one call of the device tool (its machines hold torch, Triton, JAX and
# pytest, but no network: nothing is installed). Results go under $OUT:
#   machine.txt   nvidia-smi, torch / Triton / JAX versions
#   tests.log     tests/test_triton.py compiled on the GPU, and the gpu-marked tests
#   sweep.jsonl   the triton kernels' tile sizes against cuDNN, layer forward + backward (triton_sweep.py)
#   bench.md      the harness's train-step tables on the GPU, rnnkit against its competitors
# Each stage has its own time limit (at most 8.5 minutes in all, usually less), and one failing does not
# stop the rest. The device tool's budget is 15 minutes a session, start-up included: one run.
#   device run: bash benchmarks/gpu_check.sh      (timeout_s 590)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rnnkit-gpu}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
{
  date -u
  nvidia-smi
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1
} >"$OUT/machine.txt" 2>&1 &
info=$!
# the compile test checks sm_90 builds from a CPU machine: on the GPU the other tests build and run them
timeout -k 10 120 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" -k "not compile_for_an_h100" tests/test_triton.py \
  tests/test_layers.py::test_matches_torch_on_cuda tests/test_checkpoint.py::test_round_trip_on_cuda_resumes_bit_for_bit \
  >"$OUT/tests.log" 2>&1
tests=$?
wait $info
echo "tests: exit $tests" >>"$OUT/machine.txt"
timeout -k 10 130 "$PY" benchmarks/triton_sweep.py --rounds 10 >"$OUT/sweep.jsonl" 2>"$OUT/sweep.err"
echo "sweep: exit $?" >>"$OUT/machine.txt"
# one harness run per shape, each appending its tables as it ends: a run cut short loses only its own
for spec in "60|T28 I28 H128 B128" "50|T28 I28 H256 B128" "60|T28 I28 H512 B512" "70|T784 I1 H128 B128"; do
  timeout -k 10 "${spec%%|*}" "$PY" benchmarks/run.py --device cuda --rounds 10 --shapes "${spec#*|}" \
    --only "torch.nn.LSTM" "Python-loop LSTM" "JAX" "rnnkit.LSTM" --write --results-file "$OUT/bench.md" \
    >>"$OUT/bench.log" 2>&1
  echo "bench ${spec#*|}: exit $?" >>"$OUT/machine.txt"
done
cat "$OUT/machine.txt"
tail -3 "$OUT/tests.log"
cat "$OUT/sweep.jsonl"
