#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md §8 in one run, for a GPU machine such as the device tool's
# H200 (its image: jax 0.11 with CUDA, flax, optax, diffrax, orbax, PyTorch). From the
# repository root:
#
#   OUT=results bash benchmarks/gpu.sh           # on the GPU
#   OUT=/tmp/gpu QUICK=1 bash benchmarks/gpu.sh  # the same commands at toy sizes (any machine)
#   OUT=results PARTS=steps bash benchmarks/gpu.sh   # one part (steps, epochs, input) per call
#
# 1. train-step img/s of every model x variant (benchmarks.train_step; conv_impl auto, which
#    is XLA's convolution off the CPU); 2. one epoch of ResNet-4 and ResNet-10 conf1 through
#    train.py on the bundled CIFAR-10, with the host and with the device input pipeline;
#    3. benchmarks.input_path (host against device, 1/5/20 steps per dispatch).
# Writes six files to $OUT (train_step.{json,md}, input_path.{json,md}, epochs.md and
# epochs.log); the runs' work directories go to $OUT.runs. Packages the image lacks
# (ml_collections, tensorboardX) travel as wheels in .whl/ (the device tool's README says
# how): when that folder exists they are installed into /tmp/site first.
set -euo pipefail
: "${OUT:?set OUT to the folder for the results}"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$OUT" "$OUT.runs"
if [ -n "${QUICK:-}" ]; then
  step=(--models resnet4 --variants baseline,anodev2_conf1 --steps 2 --warmup 1)
  epoch=(--config.data_source=synthetic --config.num_train=1024 --config.num_test=256
         --config.log_every_steps=1)
  input=(--steps 4 --rounds 1 --num_train 2048 --log_every_steps 2 --steps_per_dispatch 1,2)
else
  step=()
  epoch=(--config.data_source=bundled)
  input=()
fi

PARTS=${PARTS:-steps,epochs,input}
part() { [[ ",$PARTS," == *",$1,"* ]]; }

if part steps; then
  "$PY" -m benchmarks.train_step --conv_impl auto "${step[@]}" \
    --json "$OUT/train_step.json" --markdown "$OUT/train_step.md"
fi

if part epochs; then
  : > "$OUT/epochs.log"
  for model in resnet4 resnet10; do
    for pipeline in host device; do
      run="$OUT.runs/$model-$pipeline"
      rm -rf "$run"  # else train.py resumes the finished run and trains nothing
      echo "== $model anodev2_conf1, input pipeline $pipeline" >> "$OUT/epochs.log"
      "$PY" train.py --config="configs/$model.py" --config.variant=anodev2_conf1 \
        --config.num_epochs=1 --config.input_pipeline="$pipeline" --config.progress_bar=False \
        "${epoch[@]}" --workdir="$run" >> "$OUT/epochs.log" 2>&1
    done
  done
  "$PY" - "$OUT" <<'EOF'
"""epochs.md: per run, the epoch's training time from its logged img/s (the first log window,
which holds the compilation, left out) and the whole run's wall time."""
import json, pathlib, statistics, sys
import jax

out = pathlib.Path(sys.argv[1])
lines = [
    f"devices: {jax.devices()}", "",
    "| model | variant | input pipeline | train img/s (median window) | epoch s at that rate "
    "| run wall s (compile, data, test included) | test accuracy |",
    "| --- | --- | --- | ---: | ---: | ---: | ---: |",
]
for run in sorted(pathlib.Path(f"{out}.runs").iterdir()):
    results = json.loads((run / "results.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_sec"] for r in records if r.get("kind") == "train"][1:]
    rate = statistics.median(rates) if rates else float("nan")
    config = results["config"]
    images = results["steps"] * config["batch_size"]
    model, pipeline = run.name.rsplit("-", 1)
    lines.append(
        f"| {model} | {config['variant']} | {pipeline} | {rate:,.0f} | {images / rate:.1f} "
        f"| {results['wall_time_sec']:.1f} | {results['final_test_accuracy']:.4f} |"
    )
(out / "epochs.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
fi

if part input; then
  "$PY" -m benchmarks.input_path "${input[@]}" \
    --json "$OUT/input_path.json" --markdown "$OUT/input_path.md"
fi
