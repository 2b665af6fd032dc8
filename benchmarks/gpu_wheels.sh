#!/usr/bin/env bash
# FlashAttention-4 and bitsandbytes for the GPU machine, which has no network: fetch the wheels here, install them
# into one folder, pack it, and cut the pack into as many carries as the 64 MiB per-call transfer needs.
#
# Why packed and split: the CUDA 13 CuTe DSL runtime wheel alone (nvidia-cutlass-dsl-libs-cu13, 91,954,433 bytes)
# is larger than what one device call can carry next to this repository (64 MiB for the working tree and the
# carried paths together). The installed folder packed with xz -9 is about 69 MB, so it travels in two parts over
# two back-to-back calls and is put together again on the device (the machine stays warm 30 s after a call).
#
# bitsandbytes (int8 on CUDA; the device image lacks it) rides in the same pack: its wheel is 43 MB because it
# holds a library per CUDA version, and only libbitsandbytes_cuda130.so (3.9 MB; the device's torch is cu130) and
# the CPU one are kept, which adds about 2 MB to the pack.
#
# Usage:
#   here (CPU, network):  bash benchmarks/gpu_wheels.sh [prepare]   # download, pack, split, print the plan
#   here, optional:       bash benchmarks/gpu_wheels.sh xformers    # xformers 0.0.35 + libcudart.so.12, see below
#   on the GPU machine:   bash benchmarks/gpu_wheels.sh stash       # every call but the last
#                         bash benchmarks/gpu_wheels.sh unpack      # the last call: join, check, extract
# Everything lands in build/gpu-wheels/ (ignored by git); nothing here goes into the repository.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

DEST=build/gpu-wheels
DEVICE_DIR=/tmp/optkit-gpu-site         # outside the repository copy on the device: survives the next call
ARCHIVE=gpu-site.tar.xz
LIMIT=$((64 * 1024 * 1024))             # working tree + carried paths, per call (device README, Limits)
MARGIN=$((2 * 1024 * 1024))             # room for files the tree gains before the session
# The device's python3 is 3.12 (KINDS.md: 3.12.3, torch 2.11.0+cu130, driver 580 = CUDA 13.0).
PIP_TAGS=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# flash-attn-4's needs that the device image lacks (it has torch, einops, typing-extensions, protobuf and
# cuda-bindings). nvidia-cutlass-dsl names the cu12 runtime; the cu13 one replaces it (the DSL loads whichever
# flavor is installed that the driver supports), so cu12 is left out.
FA4_WHEELS=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
            nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5
            apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5)
INT8_WHEELS=(bitsandbytes==0.50.2)     # needs torch, numpy, packaging: all on the device
KEEP_BNB_LIBS=(libbitsandbytes_cpu.so libbitsandbytes_cuda130.so)
SITE_PATH="$DEVICE_DIR/site:$DEVICE_DIR/site/nvidia_cutlass_dsl/dsl_packages"

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

tree_bytes() {
  # What every call sends besides its carried paths: tracked files and untracked files git does not ignore.
  { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s 2>/dev/null |
    awk '{ s += $1 } END { print s + 0 }'
}

prepare() {
  mkdir -p "$DEST/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: "${PIP_TAGS[@]}" -d "$DEST/wheels" "${FA4_WHEELS[@]}" \
    "${INT8_WHEELS[@]}"
  echo "FA4 and bitsandbytes wheels (Python 3.12, manylinux x86_64):"
  local total=0 size f
  for f in "$DEST"/wheels/*.whl; do
    size=$(stat -c %s "$f"); total=$((total + size))
    printf '  %11d  %s\n' "$size" "$(basename "$f")"
  done
  printf '  %11d  total (%s)\n' "$total" "$(mib "$total")"

  if [ ! -s "$DEST/$ARCHIVE" ] || [ -n "$(find "$DEST/wheels" -newer "$DEST/$ARCHIVE" -name '*.whl')" ]; then
    rm -rf "$DEST/site" "$DEST/$ARCHIVE"
    python3 -m pip install -q --no-deps --no-index --no-compile --only-binary=:all: "${PIP_TAGS[@]}" \
      --target "$DEST/site" "$DEST"/wheels/*.whl
    trim_bitsandbytes "$DEST/site/bitsandbytes"
    echo "packing $(du -sb "$DEST/site" | cut -f1) bytes installed with xz -9 (a few minutes on 2 cores)"
    tar -C "$DEST/site" -cf - . | xz -9 -T2 > "$DEST/$ARCHIVE.tmp"
    mv "$DEST/$ARCHIVE.tmp" "$DEST/$ARCHIVE"
  fi
  split_into_carries
}

trim_bitsandbytes() {
  # bitsandbytes picks its library by torch's CUDA version (BNB_CUDA_VERSION overrides it): keep the cu130 one.
  local lib keep kept
  for lib in "$1"/libbitsandbytes_*.so; do
    kept=0
    for keep in "${KEEP_BNB_LIBS[@]}"; do [ "$(basename "$lib")" = "$keep" ] && kept=1; done
    [ "$kept" = 1 ] || rm -f "$lib"
  done
  echo "bitsandbytes libraries kept: $(cd "$1" && ls libbitsandbytes_*.so | tr '\n' ' ')"
}

split_into_carries() {
  local archive_bytes tree room parts i
  archive_bytes=$(stat -c %s "$DEST/$ARCHIVE")
  tree=$(tree_bytes)
  room=$((LIMIT - tree - MARGIN))
  if [ "$room" -le 0 ]; then
    echo "error: the repository alone ($(mib "$tree")) leaves no room under the 64 MiB per-call limit" >&2
    exit 1
  fi
  parts=$(( (archive_bytes + room - 1) / room ))
  rm -rf "$DEST"/carry*
  (cd "$DEST" && sha256sum "$ARCHIVE" > "$ARCHIVE.sha256")
  for i in $(seq 1 "$parts"); do mkdir -p "$DEST/carry$i"; done
  split -n "$parts" -d -a 1 "$DEST/$ARCHIVE" "$DEST/$ARCHIVE.part"
  for i in $(seq 1 "$parts"); do
    mv "$DEST/$ARCHIVE.part$((i - 1))" "$DEST/carry$i/"
    cp "$DEST/$ARCHIVE.sha256" "$DEST/carry$i/"
  done

  echo
  echo "archive $ARCHIVE: $archive_bytes bytes ($(mib "$archive_bytes")); repository sends $(mib "$tree");"
  echo "room per call $(mib "$room") (64 MiB - tree - $(mib "$MARGIN") margin) -> $parts carr$([ "$parts" = 1 ] && echo y || echo ies)"
  for i in $(seq 1 "$parts"); do echo "  $DEST/carry$i: $(du -sb "$DEST/carry$i" | cut -f1) bytes"; done
  echo
  echo "Plan for the GPU session (each call back to back: the machine stays warm only 30 s after a call,"
  echo "and a cold machine starts bare, losing the parts stashed before):"
  for i in $(seq 1 $((parts - 1))); do
    echo "  call $i: run(carry=[\"$DEST/carry$i\"], command=\"bash benchmarks/gpu_wheels.sh stash\")"
  done
  echo "  call $parts: run(carry=[\"$DEST/carry$parts\"], command=\"bash benchmarks/gpu_wheels.sh unpack &&"
  echo "          bash benchmarks/gpu_session.sh proof\")   # it puts $SITE_PATH on PYTHONPATH itself"
  echo "The second PYTHONPATH entry stands in for nvidia_cutlass_dsl_packages.pth, which Python reads only in"
  echo "site-packages, not in a PYTHONPATH folder. Don't carry .whl/.gl with these unless the room above allows."
}

stash() {
  # On the device: keep this call's parts outside the repository copy, where the next call's transfer can't touch them.
  mkdir -p "$DEVICE_DIR"
  local found=0 d
  for d in "$DEST"/carry*/; do
    [ -d "$d" ] || continue
    cp "$d"/* "$DEVICE_DIR"/; found=1
  done
  [ "$found" = 1 ] || { echo "error: no $DEST/carry* folder arrived; name it in the call's carry" >&2; exit 1; }
  ls -l "$DEVICE_DIR"
}

unpack() {
  stash
  cd "$DEVICE_DIR"
  cat "$ARCHIVE".part* > "$ARCHIVE"
  if ! sha256sum -c "$ARCHIVE.sha256"; then
    echo "error: $ARCHIVE is incomplete (parts: $(ls "$ARCHIVE".part* | tr '\n' ' ')): the machine went cold" \
         "between the calls; run every call again, back to back" >&2
    exit 1
  fi
  rm -rf site && mkdir site
  python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$ARCHIVE" site
  PYTHONPATH="$SITE_PATH${PYTHONPATH:+:$PYTHONPATH}" python3 -c \
    "import cutlass, flash_attn.cute, bitsandbytes; print('FA4 ready:', flash_attn.cute.__file__);
print('bitsandbytes', bitsandbytes.__version__, 'ready')"
}

xformers_prepare() {
  # xformers 0.0.35 (3.3 MB) is built against torch 2.10.0+cu128 through PyTorch's stable C ABI and needs
  # libcudart.so.12, which torch 2.11+cu130 does not bring; this carries that one library beside it. Untested on
  # a GPU: an optional check of whether its _C.so then loads (its attention is PyTorch's own aten kernels).
  local dir="$DEST/xformers"
  mkdir -p "$dir"
  python3 -m pip download -q --no-deps --only-binary=:all: "${PIP_TAGS[@]}" -d "$dir" \
    xformers==0.0.35 nvidia-cuda-runtime-cu12==12.9.79
  ls -l "$dir"
  echo "on the device (carry=[\"$dir\"]):"
  echo "  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/optkit-xf $dir/xformers-*.whl &&"
  echo "  mkdir -p /tmp/optkit-cudart12 && python3 -m zipfile -e $dir/nvidia_cuda_runtime_cu12-*.whl /tmp/optkit-cudart12 &&"
  echo "  export PYTHONPATH=/tmp/optkit-xf\${PYTHONPATH:+:\$PYTHONPATH}" \
       "LD_LIBRARY_PATH=/tmp/optkit-cudart12/nvidia/cuda_runtime/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} &&"
  echo "  python3 -m xformers.info | grep -i -E 'build.cuda|fa2F|cutlassF'"
}

case "${1:-prepare}" in
  prepare) prepare ;;
  stash) stash ;;
  unpack) unpack ;;
  xformers) xformers_prepare ;;
  *) echo "usage: bash benchmarks/gpu_wheels.sh [prepare|stash|unpack|xformers]" >&2; exit 2 ;;
esac
