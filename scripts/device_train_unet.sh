#!/bin/bash
# Continue the demo model's unet phase on a lent GPU machine (the `device` tool), in one call.
#
# Prepare once, in the repo root of the session's checkout (both folders stay out of git):
#   printf '/.whl/\n/.gpu/\n' >> .git/info/exclude
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
#   mkdir -p .gpu && python scripts/train_demo_model.py --save-photos .gpu/photos.npz
# What travels to the device is at most 64 MiB, and the committed tree is over it (training
# checkpoints 52 MB + the embedded bundle 28 MB), so take the bundle out of the index for the
# call (the device needs only the checkpoints) and put it back afterwards:
#   git rm -r -q --cached src/dragondiffusion/demo_model
#   echo /src/dragondiffusion/demo_model/ >> .git/info/exclude
#   ... device run ...
#   git reset -q -- src/dragondiffusion/demo_model
#   sed -i '\#^/src/dragondiffusion/demo_model/$#d' .git/info/exclude
# (2026-11-26: a call with the bundle untracked and excluded sent 60 MB, .whl included, and ran.)
# .gpu/photos.npz (8 MB) is needed only where the device's scikit-image lacks the photos (the
# H200 machine's had them): carry [".whl"] alone when it fits, [".whl", ".gpu"] otherwise.
# Then: device run, command `MIN=6 bash scripts/device_train_unet.sh`, carry [".whl"] (above),
# timeout_s about 60 * MIN + 120, and MIN small enough that the call ends inside the session's
# device time (status: budget_left_s, less 1-2 minutes for the machine's start). A checkpoint is
# written and shipped every 2 minutes, so a call cut off early still returns its last one.
# Afterwards, here:
#   cat $FILES_AT/unet.part.* > /tmp/unet.safetensors
#   [ "$(sha256sum < /tmp/unet.safetensors | cut -d' ' -f1)" = "$(cat $FILES_AT/unet.sha256)" ] &&
#     cp /tmp/unet.safetensors training/demo-model/checkpoints/unet.safetensors
#   cp $FILES_AT/unet_log.jsonl training/demo-model/
# and append the last entry of $FILES_AT/run.json's "runs" to training/demo-model/run.json (the
# device starts from this checkout's run.json). The checkpoint comes back compacted (no Adam
# moments) and split into 15 MB parts, because the device returns files of at most 16 MiB.
#
# RUN: the run folder (training/demo-model). DEVICE: cuda (cpu runs the same steps, to check
# the script without a GPU). MIN: training minutes after the latent cache is built (about 35 s
# for 40000 images with 15 workers on an H200 machine; a warm machine reuses it). BATCH, CACHE:
# this run's batch and cache size. On an H200, batch 256 ran at 0.093 s per step (about 2750
# samples/s; 2026-11-26), batch 512 at 0.126 s (4100/s), and batch 1024 with FREEZE_TEXT=1 at
# 0.11-0.12 s (about 9000/s; a 100 000-image cache took 88 s). FREEZE_TEXT=1: train the UNet
# alone on caption embeddings computed once (--freeze-text; 19 % less time per step on 2 CPU
# cores). That run of 2026-11-26 was thrown away: its embeddings came from an untrained text
# encoder (fixed since, and tested). DECAY: minutes at the end of the run over which the
# learning rate falls linearly to a tenth (--decay-minutes; the run must reach its --minutes,
# so LIMIT must cover the cache, about 90 s for 100 000 images, plus 60 * MIN). Suggested next
# call (2026-11-26, untried): MIN=6.5 BATCH=1024 CACHE=100000 FREEZE_TEXT=1 DECAY=2, LIMIT left at
# its default, timeout_s 600. To check the script without a GPU (165 s on 2 cores, 2026-11-26):
#   cp -r training/demo-model /tmp/copy && mkdir -p /tmp/o && OUT=/tmp/o RUN=/tmp/copy \
#   DEVICE=cpu MIN=1.5 DECAY=0.5 BATCH=8 CACHE=500 WORKERS=2 FREEZE_TEXT=1 bash scripts/device_train_unet.sh
# CKPT: minutes between checkpoints (2). LIMIT: seconds after which the
# run is sent SIGTERM, which makes it checkpoint and stop. If the call is cut off, run.json holds
# no entry for the run: add one by hand from train.log.
set -u
T0=$(date +%s)
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
RUN=${RUN:-training/demo-model}
DEVICE=${DEVICE:-cuda}
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__, torch.cuda.is_available())" || exit 1
if ! python3 -c "import sys; sys.path.insert(0, 'scripts'); import train_demo_model as t; t.load_photos(t.TRAIN_PHOTOS)" 2> /dev/null; then
  echo "photos: from .gpu/photos.npz"
  export DRAGONDIFFUSION_PHOTO_ARCHIVE=.gpu/photos.npz
fi
MIN=${MIN:-6}
LIMIT=${LIMIT:-$(python3 -c "print(int(60 * $MIN + 150))")}
REBASE=${REBASE:---rebase}

# ship: the run's current checkpoint, compacted (no Adam moments), as 15 MB parts in $OUT, with
# the logs. It runs after every checkpoint the training writes (every 2 minutes) and at the end,
# so a call cut short by the device's time limit still returns the last checkpoint.
ship() {
  cp "$RUN/checkpoints/unet.safetensors" /tmp/ship/checkpoints/unet.safetensors || return 1
  python3 scripts/train_demo_model.py --out /tmp/ship --compact unet > /dev/null || return 1
  rm -f "$OUT/unet.sha256" "$OUT"/unet.part.*
  split -b 15000000 -d /tmp/ship/checkpoints/unet.safetensors "$OUT/unet.part." || return 1
  cp "$RUN/unet_log.jsonl" "$RUN/run.json" "$OUT/"
  # Written last: parts that match it are one whole checkpoint, even if the call was cut off.
  sha256sum < /tmp/ship/checkpoints/unet.safetensors | cut -d' ' -f1 > "$OUT/unet.sha256"
}
mkdir -p /tmp/ship/checkpoints
watch_checkpoints() {
  local seen=""
  while sleep 15; do
    local now
    now=$(stat -c %Y "$RUN/checkpoints/unet.safetensors" 2> /dev/null)
    if [ -n "$now" ] && [ "$now" != "$seen" ] && [ "$now" -gt "$T0" ]; then
      ship && seen=$now && echo "shipped the checkpoint of $(date -d @"$now" +%T)"
    fi
  done
}
watch_checkpoints &
WATCHER=$!

EXTRA=()
[ "${FREEZE_TEXT:-0}" = 1 ] && EXTRA+=(--freeze-text)
[ -n "${DECAY:-}" ] && EXTRA+=(--decay-minutes "$DECAY")
timeout --signal=TERM --kill-after=40 "$LIMIT" python3 scripts/train_demo_model.py --phase unet \
  --out "$RUN" --resume $REBASE --device "$DEVICE" --workers "${WORKERS:-15}" \
  --batch "${BATCH:-256}" --cache "${CACHE:-40000}" --minutes "$MIN" --checkpoint-minutes "${CKPT:-2}" \
  --threads 4 "${EXTRA[@]}" > "$OUT/train.log" 2>&1
echo "train: exit $? after $(( $(date +%s) - T0 )) s"
kill "$WATCHER" 2> /dev/null
wait "$WATCHER" 2> /dev/null
tail -3 "$OUT/train.log"
ship || exit 1
cat "$OUT/unet.sha256"
echo "total $(( $(date +%s) - T0 )) s"
