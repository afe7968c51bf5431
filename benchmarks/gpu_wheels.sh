#!/usr/bin/env bash
# Prepares .whl/, what benchmarks/gpu_check.sh needs on the device machine's bare GPU image and cannot
# fetch there (no network): run it HERE, on a machine with pip and this project's .venv, then carry
# .whl in the device call (the command is at the top of gpu_check.sh).
#
#   bash benchmarks/gpu_wheels.sh        # ~1 min; prints the wheel list, sizes, and what travels in all
#
# .whl/ holds
#   - wheels for the image's Python (3.12, x86-64) of the packages it lacks: deepspeed (an sdist upstream,
#     so built here into a pure-Python wheel with DS_BUILD_OPS=0: no compiled ops, torch_adam needs none),
#     megatron-core, and deepspeed's pydantic stack and hjson; plus typing-extensions and packaging at the
#     versions pydantic and megatron-core require, which gpu_check.sh installs only if the image's are
#     older. torch is never carried: the image's CUDA build is used.
#   - data/: the seq-128 data_prep output of the first 2,000 documents of the embedded corpus (~1 MB),
#     prepared here because data prep needs packages too large to carry (blingfire, the vocab package).
# The versions are the ones this project's .venv runs (requirements.txt pins and their resolved needs).
# .whl/ is git-ignored through .git/info/exclude (added here if missing); never commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.whl
GPU_PYTHON=${GPU_PYTHON:-3.12}      # the image's python3 (device KINDS.md: Python 3.12.3)
LIMIT_MIB=${LIMIT_MIB:-60}          # the device tool carries 64 MiB in all (working tree included)

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf "$DEST"
mkdir -p "$DEST"

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pin() { grep -E "^$1==" requirements.txt | head -1; }

binary=("$(pin megatron-core)")
for dist in pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson packaging; do
  binary+=("$dist==$(version "$dist")")
done
echo "== downloading wheels for CPython $GPU_PYTHON manylinux x86-64: ${binary[*]}"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$GPU_PYTHON" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${binary[@]}" 2> >(grep -v "is ignored: it is neither" >&2)

echo "== building $(pin deepspeed) as a wheel (DS_BUILD_OPS=0, against this venv's torch, no build isolation)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$DEST" \
  "$(pin deepspeed)" 2> >(grep -v "is ignored: it is neither" >&2)

echo "== preparing data: seq 128, the first 2,000 documents of the embedded corpus"
"$PY" - "$DEST/data" <<'PYEOF'
import os, sys
sys.path.insert(0, os.getcwd())
from data_prep.testing import build_tiny_dataset
out = sys.argv[1]
build_tiny_dataset(out, seq_lengths=(128,), n_docs=2000, workers=2,
                   cache_dir=os.path.join(os.path.dirname(out), ".cache"))
PYEOF
rm -rf "$DEST/.cache" "$DEST/data.lock"

echo "== checking: one version per package, every requirement carried or on the image"
"$PY" - "$DEST" "$GPU_PYTHON" <<'PYEOF'
import glob, os, re, sys, zipfile
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

dest, pyver = sys.argv[1], sys.argv[2]
env = default_environment()
env.update(python_version=pyver, python_full_version=pyver + ".3", sys_platform="linux",
           platform_system="Linux", platform_machine="x86_64", implementation_name="cpython")
carried = {}
requires = {}
for path in sorted(glob.glob(os.path.join(dest, "*.whl"))):
    name = canonicalize_name(os.path.basename(path).split("-")[0])
    if name in carried:
        sys.exit(f"two wheels of {name}: keep one (pip install stops on both)")
    carried[name] = path
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(l.split(":", 1)[1].strip()) for l in lines if l.startswith("Requires-Dist:")]
    requires[name] = [r for r in reqs if r.marker is None or r.marker.evaluate({**env, "extra": ""})]
# The image's packages as the device notes list them (KINDS.md, "Python packages already there").
image = set()
kinds = "/work/.library/device/KINDS.md"
if os.path.exists(kinds):
    text = open(kinds).read()
    m = re.search(r"Packages: (.*?)\.\n", text[text.find("Python packages already there"):], re.S)
    if m:
        image = {canonicalize_name(p.strip()) for p in m.group(1).split(",")}
missing = []
for name, reqs in requires.items():
    for r in reqs:
        n = canonicalize_name(r.name)
        if n not in carried and image and n not in image:
            missing.append(f"{name} needs {r}")
if not image:
    print("  (device package list not found here: requirements not checked against the image)")
if missing:
    sys.exit("  not carried and not on the image: " + "; ".join(missing))
print(f"  {len(carried)} wheels; every requirement is carried or on the image" if image else "")
PYEOF

echo "== what travels (limit ${LIMIT_MIB} MiB of the device tool's 64 MiB)"
(cd "$DEST" && ls -l *.whl | awk '{printf "  %-90s %8.2f MiB\n", $9, $5/1048576}')
wheels=$(cat "$DEST"/*.whl | wc -c)
data=$(du -sb "$DEST/data" | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total=$((wheels + data + tree))
awk -v w="$wheels" -v d="$data" -v t="$tree" -v s="$total" 'BEGIN {
  printf "  wheels %.2f MiB + data %.2f MiB + working tree %.2f MiB = %.2f MiB\n", w/1048576, d/1048576, t/1048576, s/1048576 }'
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "over ${LIMIT_MIB} MiB: the device call would be refused" >&2
  exit 1
fi
