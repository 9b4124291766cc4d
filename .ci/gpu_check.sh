#!/usr/bin/env bash
# GPU figures for the README (issue 4). Run from the repository root on a machine with one CUDA GPU:
#
#     bash .ci/gpu_check.sh            # all of it, ~5-8 minutes on an H200-class GPU
#     bash .ci/gpu_check.sh bench      # only 1.;  bash .ci/gpu_check.sh fit  # only 2.
#
# 1. `python -m course_utils bench --device cuda`, eager and with --compile (plain vs course, train and eval);
# 2. the lesson's full three-stage schedule (5+15+30 = 50 epochs, ResNet18+CBAM at 32 px, batch 128) on
#    50,000 training + 10,000 validation images, timed end to end (training and per-epoch evaluation),
#    eager and with torch.compile. CIFAR-10 from data/cifar-10-batches-py if it is there; otherwise
#    synthetic uint8 images of CIFAR's shape (the time does not depend on the pixels).
# Targets: the 50-epoch run in at most 120 s; course path >= 5x the plain approach in train images/s.
# Figures (JSON) land in ${OUT:-output/gpu-figures}/ (output/ is not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-output/gpu-figures}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("torch", torch.__version__, torch.cuda.get_device_name())'

WHAT=${1:-all}

if [ "$WHAT" != fit ]; then
echo "=== bench, eager ==="
"$PY" -m course_utils bench --device cuda --repeats 3 --no-progress --json "$OUT/bench_cuda.json"
echo "=== bench, torch.compile ==="
"$PY" -m course_utils bench --device cuda --repeats 3 --no-progress --compile --no-lesson \
    --json "$OUT/bench_cuda_compile.json"
fi

if [ "$WHAT" != bench ]; then
for COMPILE in 0 1; do
echo "=== full three-stage schedule, 50 epochs, compile=$COMPILE ==="
COMPILE=$COMPILE OUT=$OUT "$PY" - <<'EOF'
import json, os, time
import torch
from course_utils import data as cdata
from course_utils.finetune import three_stage_schedule
from course_utils.models import resnet18_cbam
from course_utils.train import fit

compile_ = os.environ["COMPILE"] == "1"
try:
    data = cdata.load_cifar10(download=False, verbose=False)
except cdata.DataUnavailableError:
    data = None
if data is None or not data.full:  # only the shipped 5,000-image subset: time on synthetic full-size data
    g = torch.Generator().manual_seed(0)
    data = cdata.CifarData(torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=g),
                           torch.randint(0, 10, (50_000,), generator=g),
                           torch.randint(0, 256, (10_000, 3, 32, 32), dtype=torch.uint8, generator=g),
                           torch.randint(0, 10, (10_000,), generator=g), "synthetic uint8 images", False)
print(data)
torch.manual_seed(0)
model = resnet18_cbam(weights=None)  # the time does not depend on the starting weights
train_loader, val_loader = cdata.make_loaders(data, batch_size=128, device="cuda", channels_last=True)
schedule = three_stage_schedule()  # (5, 15, 30) epochs, lr 1e-3 / 1e-4 / 1e-5
torch.cuda.synchronize()
start = time.perf_counter()
history = fit(model, schedule, train_loader, val_loader, device="cuda", progress=False, compile=compile_)
torch.cuda.synchronize()
total = time.perf_counter() - start
rows = history.stage_summary()
for r in rows:
    print(f"  stage {r['stage']:14s} epochs {r['epochs']:6s} {r['seconds']:6.1f} s  val_acc {r['val_acc']:.3f}")
print(f"{schedule.epochs} epochs, {len(data.train_labels)} train + {len(data.val_labels)} val images, compile={compile_}: "
      f"{total:.1f} s in all (first epoch {history.rows[0]['seconds']:.1f} s), "
      f"median train {sorted(history['images_per_s'])[len(history) // 2]:.0f} img/s, "
      f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB -> {'PASS' if total <= 120 else 'FAIL'} (<= 120 s)")
out = os.path.join(os.environ["OUT"], f"full_schedule_compile{int(compile_)}.json")
with open(out, "w") as f:
    json.dump({"seconds": total, "compile": compile_, "data": data.source, "gpu": torch.cuda.get_device_name(),
               "torch": torch.__version__, "stages": rows, "images_per_s": history["images_per_s"]}, f, indent=1)
EOF
done
fi

"$PY" - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
for path in sorted(glob.glob(f"{out}/bench_cuda*.json")):
    r, name = json.load(open(path)), os.path.basename(path)[:-5]
    print(f"{name}: course/plain train {r['ratio']['train']:.1f}x (target >= 5x), eval {r['ratio']['eval']:.1f}x, "
          f"course {r['train']['course']['images_per_s']:.0f} img/s vs plain {r['train']['plain']['images_per_s']:.0f}")
for path in sorted(glob.glob(f"{out}/full_schedule*.json")):
    r = json.load(open(path))
    print(f"{os.path.basename(path)[:-5]}: {r['seconds']:.1f} s (target <= 120 s) on {r['gpu']}, data: {r['data']}")
EOF
