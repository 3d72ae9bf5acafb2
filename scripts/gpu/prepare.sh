#!/usr/bin/env bash
# Run HERE (the CPU machine) before a session that has a GPU lent: `make gpu-prepare`.
# The GPU machine gets a copy of the working tree plus the "carried" ignored folders, has no network and lacks some of
# the project's Python packages, so this script puts into two ignored folders everything scripts/gpu/session.sh needs:
#   .whl/   wheels of the packages missing there (versions = this .venv's, Python 3.12 / x86-64 wheels)
#   .carry/ Fashion-MNIST's raw IDX files gzipped (data/ is ignored, so it does not travel), the small CPU-trained
#           denoiser (fallback when the GPU's own DDPM training fails), and the commit this tree was prepared from.
# Then it prints the size that will travel (limit 64 MiB; we stay under 60) and the exact `run` call to make.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3

# 1. Keep both folders out of git (and out of `git status`), so only `carry` makes them travel.
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"; touch "$exclude"
for p in /.whl/ /.carry/; do grep -qxF "$p" "$exclude" || echo "$p" >>"$exclude"; done

# 2. Wheels. Not on the GPU image: hydra-core, omegaconf, antlr4 (hydra's parser), torchattacks, pyautoattack (both
# imported by every evaluate.py run), diffusers (the DDPM U-Net), robustbench (the ResNet-18 definition),
# hydra-submitit-launcher + submitit (the project's hydra_plugins import them at Hydra's plugin scan). setuptools<81:
# robustbench imports pkg_resources, which setuptools 81 removed, and the image's setuptools version is unknown.
# Versions are this .venv's, so the GPU runs the code tested here. Rebuilt from scratch each time: two versions of one
# package in .whl would stop the whole install there (pip's cache makes this quick).
PKGS="hydra-core omegaconf antlr4-python3-runtime torchattacks pyautoattack diffusers robustbench setuptools submitit
  hydra-submitit-launcher"
version() {  # version of package $1 in the project's environment
  "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}
rm -rf .whl && mkdir -p .whl
for pkg in $PKGS; do
  spec="$pkg==$(version "$pkg")"
  if [ "$pkg" = antlr4-python3-runtime ]; then
    # Only an sdist exists on PyPI: build a (pure-python) wheel here.
    "$PY" -m pip wheel -q --no-deps -w .whl "$spec"
  else
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
  fi
done
# pyautoattack's wheel is 42 MB, 44 of its 46 MB unpacked being examples/ (a test model, TF weights) that nothing
# imports: repack it without them (RECORD too), or the tree would not fit the 64 MiB that travels.
"$PY" - .whl/pyautoattack-*.whl <<'EOF'
import os, sys, zipfile
src = sys.argv[1]
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(src + ".tmp", "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if "/examples/" in item.filename:
            continue
        data = zin.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(True) if b"/examples/" not in l)
        zout.writestr(item, data)
os.replace(src + ".tmp", src)
EOF

# 3. Data: the four raw IDX files, gzipped (47 MB of training images → 26 MB); session.sh gunzips them into
# <data_dir>/FashionMNIST/raw/, torchvision's layout, where conf/paths + datamodules/mnist_family.py look.
mkdir -p .carry/fashion-mnist
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  src=data/FashionMNIST/raw/$f dst=.carry/fashion-mnist/$f.gz
  [ -f "$dst" ] && [ "$dst" -nt "$src" ] && continue
  if [ -f "$src" ]; then gzip -9 -c "$src" >"$dst.tmp"
  else cp /usr/share/datasets/fashion-mnist/$f.gz "$dst.tmp"  # Debian's dataset-fashion-mnist: already gzipped
  fi
  mv "$dst.tmp" "$dst"
done

# 4. Weights: the 1.06 M-parameter ddpm_small (4 MB), the fallback denoiser; the ResNet-18 (45 MB) is retrained there.
small=checkpoints/fashion_mnist_rgb32/denoiser-ddpm_small.pt
if [ -f "$small" ]; then cp -p "$small" .carry/; else echo "note: $small missing (no fallback denoiser carried)"; fi

# 5. Which code this was (the GPU copy may lack .git, and then results.json has no commit); summary.md shows it.
{ git rev-parse HEAD; git status --short; } >.carry/GIT_STATE

# 6. What travels: tracked + untracked-not-ignored files (what the tool copies), plus the two carried folders.
tree=$(git ls-files -z --cached --others --exclude-standard | { xargs -0 stat -c %s 2>/dev/null || true; } |
  awk '{s+=$1} END {print s+0}')
carried=$(du -cb .whl .carry | tail -1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
total=$((tree + carried))
echo "wheels: $(ls .whl | tr '\n' ' ')"
echo "travels: working tree $(mib "$tree") MiB + .whl/.carry $(mib "$carried") MiB = $(mib "$total") MiB (limit 64)"
if [ "$total" -ge $((60 * 1048576)) ]; then echo "ERROR: over 60 MiB: trim .carry or untracked files first" >&2; exit 1; fi
cat <<'EOF'

Next, in the session that has a GPU (one call; the script stops itself within ~6 min, so a rerun still fits 15 min):
  run(command="bash scripts/gpu/session.sh", carry=[".whl", ".carry"], timeout_s=420)
Comes back: $OUT/summary.md (also printed at the end of output_tail) and $OUT/gpu_session.tgz (every log and result
file). A rerun may skip finished steps, e.g. command="SKIP=bench_targets,bench_rest bash scripts/gpu/session.sh"
(README "GPU session (when a device is lent)").
Then call give_back unless you rerun at once.
EOF
