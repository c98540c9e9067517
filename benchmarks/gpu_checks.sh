#!/usr/bin/env bash
# Every GPU check of the project, prepared on this machine and run in one call on a machine with
# one CUDA GPU and PyTorch but none of the project's other packages (no pydantic, no webdataset,
# no Ray) and no network:
#
#   bash benchmarks/gpu_checks.sh prepare            # here: wheels and data into .gpu/ (ignored)
#   bash benchmarks/gpu_checks.sh run [all|losses|loop]   # there, from the repository root
#
# `prepare` downloads the wheels of the project's pure-Python needs for CPython 3.12 on x86-64
# Linux (the versions installed in .venv), copies Fashion-MNIST and the Omniglot zip, and prints
# the call to make. `run` installs the wheels and the project's metadata (its `topk` commands)
# under /tmp/gpu-site, puts the data where the tests and benchmarks look for it, then runs, each
# check under its own time limit and all of them inside RUN_SECONDS (default 570):
#   losses  tests/topk/test_cuda.py, then benchmarks/bench_gpu.py (the losses on the GPU);
#   loop    the GPU tests of the training loop, the device JPEG decoder, in-process training on
#           CUDA and the experiment runner (processes, no Ray), then benchmarks/bench_gpu_loop.py.
# One log per check goes to $OUT (else .gpu/out), with summary.txt: each check's exit status
# and seconds. A check that the time left cannot hold is skipped and said so. Without a GPU the
# same script runs its plumbing (CUDA tests skip, the benchmarks run their smoke) as a dry run.
# `topk train` with Ray cannot run there (Ray's wheel is over what a call may carry): the
# in-process run with use_gpu is the Ray-free check of the same training path.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

GPU_DIR=.gpu
WHEELS=(pydantic pydantic-core annotated-types typing-inspection typing-extensions webdataset
        braceexpand)

prepare() {
    local python=${PYTHON:-.venv/bin/python}
    mkdir -p "$GPU_DIR/wheels" "$GPU_DIR/fashion-mnist" "$GPU_DIR/shared/data/omniglot"
    local pins=()
    for name in "${WHEELS[@]}"; do
        pins+=("$name==$("$python" -c "import importlib.metadata as m; print(m.version('$name'))")")
    done
    rm -f "$GPU_DIR"/wheels/*.whl
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$GPU_DIR/wheels" "${pins[@]}" || return 1
    local fashion=/usr/share/datasets/fashion-mnist
    if [ -d "$fashion" ]; then
        cp "$fashion"/*-ubyte.gz "$GPU_DIR/fashion-mnist/"
    else
        echo "warning: $fashion is missing (apt-get install dataset-fashion-mnist):" \
            "the loop checks will fail there" >&2
    fi
    local shared=${TOPK_SHARED_DIR:-../shared}
    local omniglot=$shared/data/omniglot/images_background_small1.zip
    if [ -f "$omniglot" ]; then
        cp "$omniglot" "$GPU_DIR/shared/data/omniglot/"
    else
        echo "warning: $omniglot is missing: the tests that train on Omniglot will skip" >&2
    fi
    du -sh "$GPU_DIR" | sed 's/\t.*/ in .gpu\/ (the call carries it)/'
    cat <<'EOF'
Now, through the device tool (one call, about 10 minutes of its 15):
  run(command="bash benchmarks/gpu_checks.sh run all", carry=[".gpu"], timeout_s=600)
The logs come back from $OUT: summary.txt, then one file per check.
EOF
}

# --- run ---------------------------------------------------------------------------------------

started=$SECONDS
out=""
summary=""

setup_machine() {
    local python=$1 site=/tmp/gpu-site
    rm -rf "$site"
    if ! "$python" -c "import pydantic, webdataset" 2>/dev/null; then  # the GPU machine
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "$GPU_DIR"/wheels/*.whl || return 1
    fi
    # The `topk` commands are entry points, found through the project's metadata: written from
    # pyproject.toml (no build backend needed); the code itself is imported from this checkout.
    if ! "$python" -c "import importlib.metadata as m; m.version('topk-service')" 2>/dev/null; then
        "$python" - "$site" <<'PYTHON' || return 1
import sys
import tomllib
from pathlib import Path

project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
info = Path(sys.argv[1]) / f"topk_service-{project['version']}.dist-info"
info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
)
groups = {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}
(info / "entry_points.txt").write_text(
    "".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items())
        for group, points in groups.items()
    )
)
PYTHON
    fi
    if [ -d "$site" ]; then
        export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
    local fashion=/usr/share/datasets/fashion-mnist
    if [ ! -d "$fashion" ] && [ -d "$GPU_DIR/fashion-mnist" ]; then
        mkdir -p "$fashion" && cp "$GPU_DIR"/fashion-mnist/*-ubyte.gz "$fashion/"
    fi
    if [ -d "$GPU_DIR/shared/data" ] && [ -z "${TOPK_SHARED_DIR:-}" ]; then
        export TOPK_SHARED_DIR=$PWD/$GPU_DIR/shared
    fi
}

# check NAME LIMIT_SECONDS COMMAND...: runs COMMAND with its output in $out/NAME.log, under
# LIMIT_SECONDS or the time left, whichever is less.
check() {
    local name=$1 limit=$2
    shift 2
    local left=$((RUN_SECONDS - (SECONDS - started)))
    if ((left < 30)); then
        printf '%-24s skipped: %ss left of RUN_SECONDS=%s\n' "$name" "$left" "$RUN_SECONDS" \
            | tee -a "$summary"
        return
    fi
    ((limit > left)) && limit=$left
    local began=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local status=$?
    local verdict="exit $status"
    ((status == 124 || status == 137)) && verdict="timed out after ${limit}s"
    printf '%-24s %-22s %4ss  %s\n' "$name" "$verdict" "$((SECONDS - began))" "$(tail -n 1 "$out/$name.log")" \
        | tee -a "$summary"
}

run_checks() {
    local part=${1:-all}
    case $part in all | losses | loop) ;; *)
        echo "usage: bash benchmarks/gpu_checks.sh run [all|losses|loop]" >&2
        return 2
        ;;
    esac
    RUN_SECONDS=${RUN_SECONDS:-570}
    out=${OUT:-$GPU_DIR/out}
    mkdir -p "$out"
    summary=$out/summary.txt
    : >"$summary"
    local python=${PYTHON:-python3}
    export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
    {
        date -u
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
            || echo "no nvidia-smi"
        "$python" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| cuda', torch.version.cuda, '| GPU:', torch.cuda.is_available())"
    } | tee "$out/machine.txt"
    if ! setup_machine "$python" >>"$out/machine.txt" 2>&1; then
        echo "setup failed: see machine.txt" | tee -a "$summary"
        tail -n 20 "$out/machine.txt"
        return 1
    fi
    local pytest=("$python" -m pytest -q -p no:cacheprovider -o addopts=-ra --timeout 240)
    if [ "$part" != loop ]; then
        check cuda-tests 200 "${pytest[@]}" tests/topk/test_cuda.py
        check bench-gpu 200 "$python" benchmarks/bench_gpu.py
    fi
    if [ "$part" != losses ]; then
        check loop-tests 200 "${pytest[@]}" tests/jobs/training/test_gpu_path.py \
            tests/jobs/training/test_in_process.py tests/jobs/training/test_device.py \
            tests/jobs/data/test_device_decode.py tests/jobs/training/test_device_decode_training.py \
            tests/jobs/experiment/test_run_processes.py
        check bench-gpu-loop 330 "$python" benchmarks/bench_gpu_loop.py
    fi
    echo "== all checks: $((SECONDS - started))s; logs in $out"
    cat "$summary"
}

case ${1:-} in
prepare) prepare ;;
run)
    shift
    run_checks "$@"
    ;;
*)
    sed -n '2,7p' "$0" >&2
    exit 2
    ;;
esac
