#!/usr/bin/env bash
# Everything optkit checks on a CUDA machine, in one call, most important first: the CUDA-graph
# decode tests, the benchmarks of issue 5 (opt-125m, opt-6.7b, opt-1.3b, transformers compiled),
# then the GPU backend tests. Packages the machine lacks travel pre-unpacked in .whl/site.
# Usage (on the GPU machine, from the repository root): OUT=/some/dir bash benchmarks/gpu_session.sh [quick]
# "quick": only the decode tests, opt-125m and opt-1.3b (a re-check after changes, about two minutes).
# "compile": the compiled decode step (generate(compile=True)): its tests, then opt-125m, opt-6.7b and
# opt-1.3b at batch 1 against the CUDA-graph step (about six minutes, most of it compilation).
# "compile-tune": transformers' static+compile next to the compiled step (opt-125m), then opt-1.3b and
# opt-6.7b with inductor's wider coordinate-descent search (radius 2, all directions) against the default.
# "offload": issue "Big models" section 6 (CUDA placement tests; opt-6.7b offloaded, against Accelerate).
# "proof": issue "GPU proof" (after `bash benchmarks/gpu_wheels.sh unpack`): the CUDA backend tests, decode
# bandwidth at opt-1.3b and opt-6.7b with each step's kernels profiled, int8 against fp16, then the kernel
# choices for one-row products (benchmarks/gemv_probe.py) at opt-1.3b's widths.
set -u
MODE=${1:-full}
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/optkit-gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
[ -d .whl/site ] && export PYTHONPATH=$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}
step() { echo; echo "=== $(date +%T) $*"; }

step install
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
python3 -c "import torch, transformers, optkit; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'optkit', optkit.__version__, optkit.registry.names('attention'))"

step smoke: graph vs plain loop on opt-tiny
timeout 60 python3 - <<'PY'
import torch, optkit
from optkit import inference
m = inference.prepare(optkit.build("opt-tiny", device="cuda", attention="sdpa").eval())
ids = torch.randint(3, 500, (2, 9), device="cuda")
a = m.generate(ids, max_new_tokens=16, eos_token_id=[])
b = m.generate(ids, max_new_tokens=16, eos_token_id=[], decode_graph=False)
kept = m.inference_session.kept_step
print("captured:", kept is not None and kept.graph is not None, "same tokens:", torch.equal(a, b))
PY

if [ "$MODE" = compile ]; then
  step smoke: compiled step vs plain loop on opt-tiny
  timeout 90 python3 - <<'PY'
import time, torch, optkit
from optkit import inference
m = inference.prepare(optkit.build("opt-tiny", device="cuda", attention="sdpa").eval())
ids = torch.randint(3, 500, (1, 9), device="cuda")
start = time.perf_counter()
a = m.generate(ids, max_new_tokens=16, eos_token_id=[], compile=True)
print(f"first compiled generate: {time.perf_counter() - start:.1f} s")
b = m.generate(ids, max_new_tokens=16, eos_token_id=[], decode_graph=False)
kept = m.inference_session.kept_step
print("captured:", kept is not None and kept.graph is not None, "same tokens:", torch.equal(a, b))
PY
  step compiled-step and graph tests
  timeout 110 python3 -m pytest tests/test_compiled_step.py tests/test_decode_graph.py -m cuda -q -rs -p no:cacheprovider 2>&1 | tail -15
  B="python3 benchmarks/bench_generate.py --device cuda --dtype float16 --write-docs --out $OUT/docs --batch 1 --long 0 --contexts --label=-compile"
  step opt-125m
  timeout 160 $B --shape opt-125m --variants sdpa/torch/float16 sdpa/torch/float16/compile eager/torch/float16/compile
  step opt-6.7b
  timeout 120 $B --shape opt-6.7b --variants sdpa/torch/float16 sdpa/torch/float16/compile --reps 3
  step opt-1.3b
  timeout 80 $B --shape opt-1.3b --variants sdpa/torch/float16 eager/torch/float16/compile --reps 3
  step done
  exit 0
fi

if [ "$MODE" = compile-tune ]; then
  B="python3 benchmarks/bench_generate.py --device cuda --dtype float16 --write-docs --out $OUT/docs --batch 1 --long 0 --contexts"
  WIDE="env TORCHINDUCTOR_COORDINATE_DESCENT_RADIUS=2 TORCHINDUCTOR_COORDINATE_DESCENT_CHECK_ALL_DIRECTIONS=1"
  step opt-125m with transformers static+compile
  timeout 130 $B --shape opt-125m --variants sdpa/torch/float16 sdpa/torch/float16/compile --hf-compiled --label=-compile-hf
  step opt-1.3b, default search
  timeout 80 $B --shape opt-1.3b --variants sdpa/torch/float16 sdpa/torch/float16/compile --reps 3 --label=-compile-sdpa
  step opt-6.7b, wide search
  timeout 120 $WIDE $B --shape opt-6.7b --variants sdpa/torch/float16 sdpa/torch/float16/compile --reps 3 --label=-compile-wide
  step opt-1.3b, wide search
  timeout 90 $WIDE $B --shape opt-1.3b --variants sdpa/torch/float16/compile --reps 3 --label=-compile-wide
  step done
  exit 0
fi

if [ "$MODE" = offload ]; then
  # Issue "Big models" section 6: the CUDA placement tests, then opt-6.7b with half its layers on the CPU and
  # on disk against transformers + Accelerate with the same map (bench_offload.py writes its table to $OUT).
  step offload: CUDA placement tests
  timeout 120 python3 -m pytest tests/test_placement_cli.py -m cuda -q -rs \
    -p no:cacheprovider 2>&1 | tail -12
  step offload: opt-6.7b all-GPU, half CPU, half disk, optkit vs transformers + Accelerate
  timeout 420 python3 benchmarks/bench_offload.py --device cuda --shape opt-6.7b --reps 2 --out "$OUT/offload"
  step done
  exit 0
fi

if [ "$MODE" = proof ]; then
  # Issue "GPU proof", after `gpu_wheels.sh unpack` in the same call (FA4 and bitsandbytes then sit in
  # /tmp/optkit-gpu-site; without them their tests skip with the reason). Most important first, ~8 minutes.
  SITE=/tmp/optkit-gpu-site/site
  [ -d "$SITE" ] && export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
  step what can run "(optkit plugins)"
  timeout 60 python3 -c "from optkit.cli import main; main(['plugins'])" 2>&1 | tail -25
  step "CUDA backend tests: flash (FA4, torch kernels), sdpa, int8; hypothesis against eager, fp16/bf16"
  timeout 200 python3 -m pytest tests/test_gpu_backends.py -m cuda -q -rs -p no:cacheprovider --timeout 90 \
    --junitxml "$OUT/gpu-backends.xml" 2>&1 | tail -40
  B="python3 benchmarks/bench_generate.py --device cuda --dtype float16 --write-docs --out $OUT/docs --batch 1 --long 0 --contexts --reps 3"
  step decode bandwidth opt-1.3b: CUDA graph and compiled step
  timeout 100 $B --shape opt-1.3b --variants sdpa/torch/float16 sdpa/torch/float16/compile --label=-proof
  step one decode step, kernel by kernel, opt-1.3b "(compile cache warm from the run above)"
  timeout 60 python3 benchmarks/profile_decode.py --shape opt-1.3b --compile --out "$OUT/profile-opt-1.3b-compile.md"
  timeout 30 python3 benchmarks/profile_decode.py --shape opt-1.3b --out "$OUT/profile-opt-1.3b-graph.md" | head -12
  step decode bandwidth opt-6.7b
  timeout 120 $B --shape opt-6.7b --variants sdpa/torch/float16 sdpa/torch/float16/compile --label=-proof
  timeout 60 python3 benchmarks/profile_decode.py --shape opt-6.7b --compile --out "$OUT/profile-opt-6.7b-compile.md"
  step int8 against fp16 on the same weights, opt-1.3b "(tokens/s and memory)"
  timeout 90 $B --shape opt-1.3b --variants sdpa/torch/float16 sdpa/int8/float16 --memory --label=-int8
  step "one-row product kernel choices at opt-1.3b's widths: cuBLAS, inductor reduction, split-K 2/4/8"
  timeout 100 python3 benchmarks/gemv_probe.py --device cuda --dtype float16 --hidden 2048 --batch 1 --reps 30 \
    --shapes q/k/v/out fc2 fused\ qkv fc1
  step done
  exit 0
fi

step CUDA-graph decode tests
timeout 90 python3 -m pytest tests/test_decode_graph.py -q -rs -p no:cacheprovider 2>&1 | tail -15

B="python3 benchmarks/bench_generate.py --device cuda --dtype float16 --write-docs --out $OUT/docs --memory"
step opt-125m
if [ "$MODE" = quick ]; then
  timeout 60 $B --shape opt-125m --variants sdpa/torch/float16 sdpa/torch/float16/nograph --batch 1 8 --long 0
else
  timeout 110 $B --shape opt-125m --variants sdpa/torch/float16 sdpa/torch/float16/nofuse sdpa/torch/float16/nograph \
    --batch 1 8
fi
if [ "$MODE" = quick ]; then
  step opt-1.3b
  timeout 60 $B --shape opt-1.3b --variants sdpa/torch/float16 --batch 1 8 --reps 3 --long 0
  step done
  exit 0
fi
step opt-6.7b
timeout 90 $B --shape opt-6.7b --variants sdpa/torch/float16 --batch 1 8 --reps 3 --long 0
step opt-1.3b
timeout 60 $B --shape opt-1.3b --variants sdpa/torch/float16 --batch 1 8 --reps 3 --long 0
step transformers static+compile, opt-125m
timeout 120 $B --shape opt-125m --variants sdpa/torch/float16 --hf-compiled --batch 1 --long 0 --label=-compiled
step GEMV efficiency per opt-6.7b shape
timeout 30 python3 benchmarks/gemv_probe.py --device cuda --dtype float16 --hidden 4096 --reps 30 --blas-only
step GPU backend tests "(flash on torch's own kernels included: test_cuda_torch_*)"
timeout 180 python3 -m pytest tests/test_gpu_backends.py -m cuda -q -rs -p no:cacheprovider 2>&1 | tail -30
step done
