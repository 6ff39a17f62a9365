#!/usr/bin/env bash
# The GPU checks of one lent-device session, in one call (a GPU is never needed by the tests or CI):
#   bash scripts/gpu_check.sh OUT_DIR [CHECK...]     (default: every check)
# Runs in a Python that already has torch with CUDA; the project's other needs (hydra-core, omegaconf, antlr4,
# pycocotools) come as wheels in .whl/ (pip download ... -d .whl) when that Python lacks them. Each step has its
# own time limit and writes its log to OUT_DIR. Checks: reference_bench (the reference against float evaluation,
# CPU and CUDA, issue 22), qat_overhead_cuda (QAT step / float step at 224x224 batch 32, issue 19), qat_profile
# (where that step's time goes, per op), cuda_tests (every test with a cuda parameter or marker) and detect_cuda
# (the detection demo trained and evaluated on the GPU), cudagraph_tests (compiled QAT replayed as CUDA graphs,
# tests/test_compile.py) and qat_overhead_cudagraphs (the QAT step compiled with mode=reduce-overhead).
set -u
out=${1:?usage: gpu_check.sh OUT_DIR [CHECK...]}
shift
checks=" ${*:-reference_bench qat_overhead_cuda qat_profile cuda_tests detect_cuda cudagraph_tests qat_overhead_cudagraphs} "
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 QAT_CACHE=/tmp/qat-cache
step() {  # step NAME SECONDS COMMAND...: one check, its log under $out, its exit status printed
  local name=$1 limit=$2; shift 2
  [[ $checks == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}
nvidia-smi -L
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name())"
grep -o -w -E 'avx2|avx512_vnni|avx_vnni|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' '; echo "cores $(nproc)"
step reference_bench 150 python3 scripts/bench/reference.py --batches 3
step qat_overhead_cuda 120 python3 scripts/bench/qat_overhead.py --device cuda --resolution 224 --batch 32 \
  --steps 10 --channels-last --csv "$out/qat_overhead_cuda.csv"
step qat_profile 90 python3 scripts/bench/qat_profile.py --device cuda --resolution 224 --batch 32 --top 30
step cuda_tests 150 python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_fidelity_pass.py \
  tests/test_mse_device.py tests/test_fused_fake_quant.py tests/test_detection_pipeline.py
step detect_cuda 170 python3 experiments/detect.py experiment=detect_demo train.device=cuda train.threads=8 \
  latency.eval_device=cuda "latency.eval_engines=[reference]" hydra.run.dir=/tmp/detect_cuda
step cudagraph_tests 200 python3 -m pytest -q -p no:cacheprovider -rs -k cuda tests/test_compile.py \
  tests/test_vectorized_fake_quant.py
step qat_overhead_cudagraphs 330 python3 scripts/bench/qat_overhead.py --device cuda --resolution 224 --batch 32 \
  --steps 8 --channels-last --compile reduce-overhead --models mobilenet_v2 resnet18 \
  --csv "$out/qat_overhead_compiled_cudagraphs.csv"
cp /tmp/detect_cuda/record.json "$out/detect_cuda_record.json" 2>/dev/null || echo "no detection record"
