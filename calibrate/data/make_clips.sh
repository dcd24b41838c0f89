#!/usr/bin/env bash
# Regenerate the embedded speech clips (see README.md in this folder for versions and results).
# Needs: espeak-ng (Debian: apt-get install -y espeak-ng), python3 with numpy, scipy, soundfile.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# name|voice|words per minute|pitch|text
clips=(
  "calib_0|en-us|165|50|The quick brown fox jumps over the lazy dog."
  "calib_1|en-gb|160|40|Please turn on the lights in the kitchen."
  "calib_2|en-us+f3|170|60|What time does the next train leave for Boston?"
  "calib_3|en-gb-scotland|155|45|Seven small boats sailed across the quiet bay."
  "eval_0|en-gb-x-rp|160|50|Remind me to call my sister tomorrow morning."
  "eval_1|en-us+m3|165|35|The weather will be sunny with a light breeze."
)
for spec in "${clips[@]}"; do
  IFS='|' read -r name voice wpm pitch text <<<"$spec"
  espeak-ng -v "$voice" -s "$wpm" -p "$pitch" -w "$tmp/$name.wav" "$text"
  python3 - "$tmp/$name.wav" "speech_$name.wav" <<'PY'
import sys
from math import gcd

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

src, dst = sys.argv[1], sys.argv[2]
x, sr = sf.read(src, dtype="float64", always_2d=True)
x = x.mean(axis=1)
g = gcd(16000, sr)
y = resample_poly(x, 16000 // g, sr // g)
# Trim espeak's leading/trailing silence to 50 ms of margin.
loud = np.flatnonzero(np.abs(y) > 1e-3)
y = y[max(loud[0] - 800, 0) : loud[-1] + 800]
sf.write(dst, np.clip(y, -1, 1), 16000, subtype="PCM_16")
print(dst, f"{len(y) / 16000:.2f} s")
PY
done
