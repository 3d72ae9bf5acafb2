#!/usr/bin/env bash
# The ONE command of a GPU session (prepared here by `make gpu-prepare`; README "GPU session (when a device is lent)"):
#   run(command="bash scripts/gpu/session.sh", carry=[".whl", ".carry"], timeout_s=420)
# Steps in priority order, each under `timeout` and all under one deadline (TOTAL_S), so that the whole script ends
# within ~6 min and a rerun still fits the 15 min of device time:
#   bench_targets  issue 15: the GPU targets of `make bench` (RAP images/s, DiffDefense s/image, denoiser FLOP/s)
#   bench_rest     issue 15: the other defense families, EOT, checkpoint memory, the eval.* speed-up flags
#   victim, ddpm   issue 12: ResNet-18 and the 35.7 M-parameter DDPM (denoiser=ddpm_cifar10) on the stand-in
#                  fashion_mnist_rgb32, each for a fixed time, side by side on the one GPU
#   eval_none, eval_chains  issue 12: experiment=disttrans_table1 rows none / diffpure / disttrans × clean / PGD,
#                  `make disttrans-cpu`'s overrides, the purifiers' s/image (eval.time_purifier)
# Everything goes to $WORK (logs/, train/, runs/, checkpoints/); at the end the logs and result files are packed into
# $OUT/gpu_session.tgz and a short $OUT/summary.md, which is also printed (the tool returns only 8 files and the
# output's tail). Knobs (environment): TINY=1 (CPU smoke test, tiny sizes, ≤ 3 min), SKIP=step,step, TOTAL_S,
# BENCH_S, BENCH_ARGS, BENCH_REST, VICTIM_S, DDPM_S (training seconds), N (test images), STEPS (reverse steps),
# ATTACKS, DDPM_LR, WORK, PY. Tested on CPU (TINY=1) with torch 2.14.1 only; the GPU image has torch 2.11.
# A failed step is reported and the next one still runs (no `set -e`).
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
export PYTHONUNBUFFERED=1
TINY=${TINY:-0}
OUT=${OUT:-/tmp/gpu_out}
WORK=${WORK:-/tmp/purify_gpu}
SKIP=${SKIP:-}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}  # the GPU image's python3 there
if [ "$TINY" = 1 ]; then
  # CPU smoke test of the same steps: a few images, 2 optimisation steps (max_time does not bind; the S values only
  # widen the guards for a busy 2-core machine), the bench's --quick sizes (part of it), PGD rows only (they score
  # the clean images too).
  : "${TOTAL_S:=170}" "${BENCH_S:=60}" "${VICTIM_S:=40}" "${DDPM_S:=40}" "${N:=4}" "${STEPS:=2}" "${ATTACKS:=pgd}"
  : "${BENCH_ARGS:=--quick}" "${BENCH_REST:=diffpure,checkpoint,flags}"
  TRAINER=cpu EPOCHS=1 DRAWS=1 VAL=1
  TINY_TRAIN="dataset.datamodule.train_subset=64 dataset.datamodule.batch_size=2 dataset.datamodule.eval_batch_size=4 \
    trainer.limit_train_batches=2 +trainer.limit_test_batches=1"
  TINY_EVAL="dataset.datamodule.eval_batch_size=4 eval.time_purifier_bs1_images=1"
else
  # ~6 min in all: setup ~15 s, bench ≤ 50 + 70 s, trainings ≤ 120 s side by side, evaluations ≥ 80 s, packing ~10 s.
  : "${TOTAL_S:=345}" "${BENCH_S:=70}" "${VICTIM_S:=60}" "${DDPM_S:=80}" "${N:=512}" "${STEPS:=10}"
  # --no-memory: the per-defense peak-memory rows cost time; the checkpoint group still measures the chain's memory.
  : "${BENCH_ARGS=--no-memory}" "${BENCH_REST:=diffdefense,diffpure,densepure,disttrans,jatp,eot,checkpoint,flags}"
  TRAINER=gpu EPOCHS=1000 DRAWS=2 VAL=4 TINY_TRAIN= TINY_EVAL=
fi
: "${ATTACKS:=none,pgd}" "${DDPM_LR:=2e-4}"
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS" "$WORK/train" "$WORK/runs"
# Weights go to a scratch folder, never over checkpoints/ (the CPU weights, when this runs here with TINY=1).
export PURIFY_CHECKPOINT_DIR=$WORK/checkpoints
export PURIFY_DATA_DIR=$(realpath -m "${PURIFY_DATA_DIR:-data}")

note() { echo "$*" | tee -a "$LOGS/steps.txt"; }

# step NAME LIMIT_S CMD…: CMD under `timeout` (never past the deadline), output → logs/NAME.log, one status line.
step() {
  local name=$1 limit=$2 t0 rc left; shift 2
  case ",$SKIP," in *",$name,"*) note "[$name] skipped (SKIP)"; return 0 ;; esac
  t0=$(date +%s); left=$((START + TOTAL_S - t0))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then note "[$name] not run: no time left before the ${TOTAL_S} s deadline"; return 1; fi
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1; rc=$?
  note "[$name] rc=$rc, $(($(date +%s) - t0)) s (limit $limit s)$([ $rc = 124 ] && echo ', TIMED OUT')"
  [ $rc = 0 ] || tail -n 12 "$LOGS/$name.log" | sed "s/^/  $name| /"
  return $rc
}

# Pack and summarise whatever exists, however the script ends (a TERM from the tool's own timeout included).
finish() {
  trap - EXIT
  note "total: $(($(date +%s) - START)) s"
  "$PY" -m evaluation.report "$WORK/runs" >"$LOGS/report.log" 2>&1
  "$PY" - "$WORK" "$TINY" >"$OUT/summary.md" 2>>"$LOGS/summary_errors.log" <<'EOF'
import glob, json, os, sys
work, tiny = sys.argv[1], sys.argv[2] == "1"
def read(p):
    try: return open(p, encoding="utf-8").read()
    except OSError: return ""
print(f"# GPU session summary{' (TINY=1: CPU smoke test, tiny sizes; numbers mean nothing)' if tiny else ''}\n")
print("Code: " + (read(".carry/GIT_STATE").strip().replace("\n", " | ") or "unknown") + "\n")
print("## Steps\n\n```\n" + read(f"{work}/logs/steps.txt") + "```\n")
print("## Environment\n\n```\n" + read(f"{work}/logs/env.log")[-1500:] + "```\n")
for name in ("bench_targets", "bench_rest"):  # the bench's own Markdown table; its JSON lines if it was cut short
    log = read(f"{work}/logs/{name}.log")
    print(f"## {name} (issue 15)\n")
    if "## make bench" in log:
        print(log[log.index("## make bench"):].strip() + "\n")
        continue
    print("| figure | value | unit | reference | ratio |\n|---|---|---|---|---|")
    for line in log.splitlines():
        if line.startswith("{"):
            try: f = json.loads(line)
            except ValueError: continue
            print(f"| {f['name']} | {f['value']} | {f['unit']} | {f['reference']} ({f['reference_label']}) | {f['ratio']} {f['ratio_meaning']} |")
    print("\n(cut short: no Markdown summary)\n")
print("## Trainings (issue 12)\n\n| weights | epochs | steps | metrics | wall s | device |\n|---|---|---|---|---|---|")
for p in sorted(glob.glob(f"{work}/checkpoints/**/*.train.json", recursive=True)):
    r = json.loads(read(p)); c = r.get("cost") or {}
    m = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.get("metrics", {}).items()))
    print(f"| {os.path.basename(r['weights'])} | {r.get('epochs')} | {r.get('global_step')} | {m} | {c.get('wall_s', 0):.0f} | {c.get('device')} |")
print("\n## disttrans_table1 rows (issue 12; full report: runs/report.md in the tarball)\n")
print("| defense | denoiser | attack | n | clean % | robust % | worst-of-N % | eval images/s | purifier images/s batched | batch 1 | SSIM |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
fmt = lambda v: "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
inv = lambda v: 1 / v if v else None  # noqa: E731
for p in sorted(glob.glob(f"{work}/runs/**/results.json", recursive=True)):
    r = json.loads(read(p)); den = (r.get("config") or {}).get("denoiser", {}).get("name", "") if r["defense"] != "none" else "–"
    print(f"| {r['defense']} | {den} | {r['attack']} | {r['n_images']} | {fmt(r.get('clean_acc'))} | {fmt(r.get('robust_acc'))} | "
          f"{fmt(r.get('robust_acc_worst'))} | {fmt(r.get('images_per_s'))} | {fmt(inv(r.get('purify_s_per_image_batched')))} | "
          f"{fmt(inv(r.get('purify_s_per_image_bs1')))} | {fmt(r.get('purified_ssim'))} |")
print(f"\nDevice of the rows: {', '.join(sorted({json.loads(read(p)).get('device', '?') for p in glob.glob(f'{work}/runs/**/results.json', recursive=True)}))}")
EOF
  # One archive (the tool returns at most 8 files): logs, training CSVs and records, every result file, the report.
  tar -czf "$OUT/gpu_session.tgz" -C "$WORK" --exclude='*.pt' --exclude='*.ckpt' --exclude=cache logs train runs \
    $(cd "$WORK" && find checkpoints -name '*.train.json' 2>/dev/null)
  cat "$OUT/summary.md"
  ls -la "$OUT"
}
trap finish EXIT
trap 'exit 143' TERM INT

# --- Setup: packages, data, weights, environment -------------------------------------------------------------------
if "$PY" -c "import hydra, omegaconf, torchattacks, pyautoattack, diffusers, robustbench" 2>/dev/null; then
  note "[setup] packages importable: no wheel install"
else
  # The GPU image lacks these (prepare.sh says which and why); no network there, so they come as wheels.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$LOGS/pip.log" 2>&1 || { note "[setup] wheel install FAILED"; tail -n 20 "$LOGS/pip.log"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  note "[setup] installed $(ls .whl | wc -l) wheels into /tmp/site"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the project itself, never pip-installed there (it would pull torch)
# Fashion-MNIST where conf/paths (data_dir) and datamodules/mnist_family.py look: <data_dir>/FashionMNIST/raw/*-ubyte.
raw=$PURIFY_DATA_DIR/FashionMNIST/raw
mkdir -p "$raw"
for gz in .carry/fashion-mnist/*.gz; do
  [ -f "$raw/$(basename "$gz" .gz)" ] || gunzip -c "$gz" >"$raw/$(basename "$gz" .gz)"
done
# The CPU-trained small denoiser: the evaluations' fallback when the DDPM training below fails.
mkdir -p "$PURIFY_CHECKPOINT_DIR/fashion_mnist_rgb32"
[ -f .carry/denoiser-ddpm_small.pt ] && cp -n .carry/denoiser-ddpm_small.pt "$PURIFY_CHECKPOINT_DIR/fashion_mnist_rgb32/"
{ command -v nvidia-smi >/dev/null && nvidia-smi; echo "python: $PY"; "$PY" -c "
import importlib.metadata as m, platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda, '| device',
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')
print(' | '.join(f'{p} {m.version(p)}' for p in ('lightning', 'hydra-core', 'diffusers', 'torchattacks', 'numpy', 'huggingface-hub')))"
} >"$LOGS/env.log" 2>&1
cat "$LOGS/env.log"
note "[setup] done in $(($(date +%s) - START)) s; data: $raw; weights: $PURIFY_CHECKPOINT_DIR; mode: TINY=$TINY"

# --- Issue 15: the bench (alone on the device, so its timings are clean) -------------------------------------------
# Its targets first (RAP ≥ 100× 7.35 images/s, DiffDefense ≤ 0.028 s/image, denoiser ≥ 40 % of the bf16 peak), then
# the rest; each prints one JSON line per figure as it goes, so a cut-short part still reports what it measured.
step bench_targets 50 "$PY" -m evaluation.bench $BENCH_ARGS --only none,rap,diffdefense_l5r5,flops
step bench_rest "$BENCH_S" "$PY" -m evaluation.bench $BENCH_ARGS --only "$BENCH_REST"

# --- Issue 12: train on the stand-in, then disttrans_table1 rows ----------------------------------------------------
# `make disttrans-cpu`'s overrides, on trainer=gpu (bf16-mixed) for a fixed time (Lightning's max_time, which still
# exports the weights; the outer timeout only catches a hang). Both trainings share the GPU: neither fills an H100.
hms() { printf '00:00:%02d:%02d' $(($1 / 60)) $(($1 % 60)); }
TRAIN="dataset=fashion_mnist_rgb32 trainer=$TRAINER trainer.max_epochs=$EPOCHS trainer.limit_val_batches=$VAL resume=false \
  +trainer.num_sanity_val_steps=0 logger=csv trainer.enable_progress_bar=false $TINY_TRAIN"
step victim $((VICTIM_S + 45)) "$PY" train.py $TRAIN victim=resnet18 +trainer.max_time=$(hms "$VICTIM_S") \
  hydra.run.dir="$WORK/train/victim" &
# Ho et al.'s CIFAR-10 learning rate 2e-4 (the config's 1e-3 is DiffDefense's small U-Net's), batch 128.
step ddpm $((DDPM_S + 40)) "$PY" train.py $TRAIN model=denoiser denoiser=ddpm_cifar10 +trainer.max_time=$(hms "$DDPM_S") \
  model.optimizer.lr="$DDPM_LR" model.sample_every_n_epochs=0 test_after_training=false hydra.run.dir="$WORK/train/ddpm" &
wait
DENOISER=ddpm_cifar10
if [ ! -f "$PURIFY_CHECKPOINT_DIR/fashion_mnist_rgb32/denoiser-ddpm_cifar10.pt" ]; then
  DENOISER=ddpm_small; note "[eval] no ddpm_cifar10 weights: the chains use the carried CPU ddpm_small"
fi
DT_BASE="dataset=fashion_mnist_rgb32 victim=resnet18 denoiser=$DENOISER eval.progress=false eval.cache_dir=$WORK/cache"
DT_N="$DT_BASE dataset.eval_subset=$N eval.n_draws=$DRAWS $TINY_EVAL"
DT_CHAIN="defense.purifier.reverse_steps=$STEPS"
DT_QUALITY="eval.time_purifier=true eval.image_quality=true"
# defense=none first: its adversarial batches (oblivious, crafted on the bare victim) are cached and reused.
step eval_none 60 "$PY" evaluate.py -m experiment=disttrans_table1 $DT_N defense=none attack=$ATTACKS \
  hydra.sweep.dir="$WORK/runs/table1/none"
step eval_chains 90 "$PY" evaluate.py -m experiment=disttrans_table1 $DT_N $DT_CHAIN $DT_QUALITY defense=diffpure,disttrans \
  attack=$ATTACKS hydra.sweep.dir="$WORK/runs/table1/chains"
