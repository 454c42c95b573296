#!/usr/bin/env bash
# The one command for a machine with a GPU, run from the repository root:
#
#   bench/gpu.sh --minutes 10 --out gpu-results [--data ../shared/data/cifar10-jpg.tar.gz]
#   bench/gpu.sh --dry-run --out /tmp/gpu-dry          # every step at toy size on the CPU
#
# 1. builds the kernels with CUDA for the GPU present and prints `fastablate info`;
# 2. runs the test suite's CUDA cases (every kernel against its reference, opcheck, gradcheck,
#    the executors against their naive loops on the device);
# 3. runs the kernel benchmarks on the device (bench/README.md's groups, torch.compile left out);
# 4. trains a pre-activation ResNet-56 and its plain twin on CIFAR-10 (bf16, channels-last, the
#    images on the device) for as many epochs as the budget allows (30 at most), then runs Veit's
#    lesion studies, paths and the noise table on the 10,000 test images, and times every study
#    on the GPU against the CPU (bench/gpu_veit.py).
# Every step writes into --out as it finishes (markdown and JSON; summary.md gathers them), so a
# run stopped early keeps what it did. The budget is wall-clock for the whole command; the epochs
# and image counts shrink to fit it, and summary.md says what was cut.
set -uo pipefail
cd "$(dirname "$0")/.."

out=gpu-results
minutes=10
data=../shared/data/cifar10-jpg.tar.gz
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "Error: bench/gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$minutes" in
  ''|*[!0-9.]*) echo "Error: bench/gpu.sh --minutes '$minutes': give a number of minutes" >&2; exit 2 ;;
esac
if [ "$dry" = 0 ] && [ ! -e "$data" ]; then
  echo "Error: bench/gpu.sh --data $data: no such file or folder (CIFAR-10 as ImageFolder JPEGs: the" \
       ".tar.gz of train/<class>/*.jpg and test/<class>/*.jpg, or that folder)" >&2
  exit 2
fi
mkdir -p "$out" || exit 2
start=$(date +%s)
deadline=$(python3 -c "print(int($start + 60 * $minutes))")
device=cuda
[ "$dry" = 1 ] && device=cpu
summary="$out/summary.md"
{
  echo "# bench/gpu.sh"
  echo
  echo "Started $(date -u +%Y-%m-%dT%H:%M:%SZ), budget $minutes min, device $device$([ "$dry" = 1 ] && echo ' (dry run)')."
  echo
} > "$summary"
log() { echo "gpu.sh: $*"; }
left() { echo $(( deadline - $(date +%s) )); }
step() {  # step NAME SECONDS_NEEDED: whether the budget still allows it (else the cut is recorded)
  if [ "$(left)" -lt "$2" ]; then
    echo "- **$1: cut**, $(left) s of the budget left, it needs about $2 s." >> "$summary"
    log "$1: cut ($(left) s left)"
    return 1
  fi
  log "$1 ($(left) s left)"
}

# 1. Build and check.
if [ "$dry" = 1 ]; then
  echo "## Build" >> "$summary"
  echo "Dry run: the installed build, CPU kernels." >> "$summary"
else
  arch=$(python3 -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(cd "$(dirname "$(readlink -f "$(command -v nvcc)")")/.." && pwd)
    export CUDA_HOME
  fi
  t0=$(date +%s)
  log "building for sm_$arch (CUDA_HOME=${CUDA_HOME:-?})"
  FASTABLATE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) \
    python3 -m pip install --no-build-isolation --no-deps --no-index -e . > "$out/build.log" 2>&1
  rc=$?
  { echo "## Build"; echo "FASTABLATE_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch: exit $rc in $(( $(date +%s) - t0 )) s" \
    "(log: build.log)."; } >> "$summary"
  if [ $rc != 0 ]; then  # the studies still run, on the pure-PyTorch references: say so and go on
    tail -30 "$out/build.log"
    echo "**The build failed: what follows runs the ops' pure-PyTorch references.**" >> "$summary"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, built or not
python3 -m fastablate info > "$out/info.txt" 2>&1
{ echo; echo '```'; cat "$out/info.txt"; echo '```'; echo; } >> "$summary"

# 2. The test suite's cases on the device: the kernels first, then the engines' fast paths.
tests() {  # tests NAME SECONDS PYTEST-ARGS...: one pytest run, its line in the summary
  local name=$1 limit=$2; shift 2
  step "$name" 30 || return 0
  local t0 rc
  t0=$(date +%s)
  timeout $(( $(left) > 2 * limit ? limit : $(left) / 2 )) python3 -m pytest -p no:cacheprovider -q \
    --durations=10 --junitxml "$out/$name.xml" "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "- $name: \`pytest $*\`: exit $rc in $(( $(date +%s) - t0 )) s:" \
    "$(grep -E '(passed|failed|error)' "$out/$name.log" | tail -1) ($name.log)." >> "$summary"
}
echo "## Tests on $device" >> "$summary"
if [ "$dry" = 1 ]; then
  tests kernel-tests 60 tests/test_op_block_skip.py tests/test_op_sparse_pixel_update.py -k "cpu and (reference or opcheck)"
  tests engine-tests 60 tests/test_lesion.py -k "cpu and executor and resnet20"
else
  tests kernel-tests 90 tests/test_op_block_skip.py tests/test_op_gaussian_noise.py tests/test_op_sparse_pixel_update.py \
    -k cuda
  tests engine-tests 90 tests -k "cuda and not test_op_"
fi
echo >> "$summary"

# 3. Kernel benchmarks on the device.
if step "benchmarks" 60; then
  t0=$(date +%s)
  only="$device and not compile"
  [ "$dry" = 1 ] && only="$only and (8x16 or 8x3)"  # the smallest group of each op
  timeout $(( $(left) > 300 ? 120 : $(left) / 3 )) python3 -m pytest -p no:cacheprovider -q \
    bench/test_block_skip.py bench/test_gaussian_noise.py bench/test_sparse_pixel_update.py \
    -k "$only" --benchmark-only --benchmark-json "$out/bench.json" \
    --benchmark-max-time 0.05 --benchmark-min-rounds 5 > "$out/bench.log" 2>&1
  rc=$?
  { echo "## Kernel benchmarks on $device"; echo "exit $rc in $(( $(date +%s) - t0 )) s (log: bench.log)."; echo; } \
    >> "$summary"
  [ -s "$out/bench.json" ] && python3 bench/report.py "$out/bench.json" > "$out/bench.md" 2>&1 && \
    cat "$out/bench.md" >> "$summary"
  echo >> "$summary"
fi

# 4. Converged networks, Veit's studies and their speed.
if step "Veit on converged networks" 90; then
  args=(--out "$out" --deadline $(( deadline - 15 )) --device "$device")
  [ "$dry" = 1 ] && args+=(--dry-run) || args+=(--data "$data")
  python3 bench/gpu_veit.py "${args[@]}" 2>&1 | tee "$out/veit.log"
  rc=${PIPESTATUS[0]}
  [ -s "$out/veit.md" ] && cat "$out/veit.md" >> "$summary"
  [ $rc = 0 ] || echo "bench/gpu_veit.py: exit $rc (log: veit.log)." >> "$summary"
fi
echo "Finished in $(( $(date +%s) - start )) s." >> "$summary"
log "results in $out (summary.md)"
