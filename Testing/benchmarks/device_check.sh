#!/usr/bin/env bash
# The prepared GPU check of `epdseg segment` (issue 16's GPU target), for a session that is
# lent a GPU machine through the device tool. Two steps:
#
#   bash Testing/benchmarks/device_check.sh prepare    # here, once: the packages the GPU
#       # machine lacks, for its Python 3.12, into .device/ (git-ignored, 28 MB:
#       # SimpleITK repacked as .tar.xz to fit the 64 MiB the tool carries; isal; pynrrd)
#   bash Testing/benchmarks/device_check.sh run        # there, as the device tool's command
#       # with carry [".device"] and timeout_s 600 (its time on a GPU not yet measured)
#
# `run` checks that the CUDA path agrees with the CPU path on the bundled sample CT (areas,
# hard labels), then runs bench_segment.py --device cuda (100 slices of 512 x 512 at
# factors 1, 2 and 4, GPU memory reported; 60 against 600 slices) and writes everything
# under $OUT (the device tool's folder that comes back), or ./device_out elsewhere.
# A dry run without a GPU: PY=.venv/bin/python CHECK_DEVICE=cpu BENCH_ARGS=--quick \
#     bash Testing/benchmarks/device_check.sh run
set -uo pipefail
cd "$(dirname "$0")/../.."
HERE=$PWD
PACKS=.device

prepare() {
    mkdir -p "$PACKS" /tmp/device_wheels
    local py=(--only-binary=:all: --python-version 3.12 --implementation cp
              --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux2014_x86_64)
    python3 -m pip download -q --no-deps "${py[@]}" -d "$PACKS" isal==1.9.1 pynrrd==1.1.3 || exit 1
    python3 -m pip download -q --no-deps "${py[@]}" -d /tmp/device_wheels SimpleITK==2.5.3 || exit 1
    rm -rf /tmp/device_sitk && mkdir -p /tmp/device_sitk
    (cd /tmp/device_sitk && python3 -m zipfile -e /tmp/device_wheels/simpleitk-2.5.3-*.whl .) || exit 1
    tar -C /tmp/device_sitk -cf - . | xz -T0 -6 > "$PACKS/simpleitk.tar.xz" || exit 1
    du -sh "$PACKS"
}

run() {
    local out=${OUT:-$HERE/device_out} py=${PY:-python3} dev=${CHECK_DEVICE:-cuda}
    mkdir -p "$out" /tmp/site
    export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$HERE/EPDSegmentation:$HERE
    if ! "$py" -c "import SimpleITK, nrrd, isal" 2>/dev/null; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$PACKS"/*.whl || exit 1
        tar -C /tmp/site -xJf "$PACKS/simpleitk.tar.xz" || exit 1
    fi
    nvidia-smi -L 2>&1 | tee "$out/gpu.txt"
    "$py" -c "import torch, SimpleITK, nrrd, isal; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))" \
        | tee -a "$out/gpu.txt" || exit 1
    local sample=Resources/Sample/EPDPhantomCT.nrrd
    for d in cpu "$dev"; do
        timeout 120 "$py" -m EPDSegmentationLib.cli.main segment "$sample" \
            -o "/tmp/check_$d" --device "$d" --protocol --overwrite 2>&1 \
            | tee "$out/segment_$d.txt" \
            || exit 1
    done
    "$py" - "$out/agreement.txt" "$dev" <<'EOF' || exit 1
import csv, sys
import nrrd, numpy as np
devices = ("cpu", sys.argv[2])
rows = {d: list(csv.DictReader(open(f"/tmp/check_{d}/EPDPhantomCT_bodycomp.csv")))
        for d in devices}
# the soft areas and, from the same slabs, the HU-protocol areas (--protocol)
worst = max(abs(float(a[k]) - float(b[k])) / max(float(a[k]), 1.0)
            for a, b in zip(rows["cpu"], rows[devices[1]])
            for k in ("area_cm2", "protocol_area_cm2") if a[k] != "")
hard = [nrrd.read(f"/tmp/check_{d}/EPDPhantomCT.seg.nrrd")[0] for d in devices]
agree = float((hard[0] == hard[1]).mean())
prot = [nrrd.read(f"/tmp/check_{d}/EPDPhantomCT_protocol.seg.nrrd")[0] for d in devices]
agree = min(agree, float((prot[0] == prot[1]).mean()))
line = (f"{devices[1]} against cpu on the sample CT: largest area difference {worst:.2e} of the area "
        f"(soft and protocol; areas under 1 cm2 against 1 cm2); hard and protocol labels equal "
        f"in at least {agree:.4%} of voxels")
print(line)
open(sys.argv[1], "w").write(line + "\n")
sys.exit(0 if worst < 1e-2 and agree > 0.99 else 1)
EOF
    timeout 420 "$py" Testing/benchmarks/bench_segment.py --device "$dev" \
        ${BENCH_ARGS:---trained --slices 100} 2>&1 | tee "$out/bench_segment_$dev.txt"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
