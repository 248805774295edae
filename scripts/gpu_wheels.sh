#!/usr/bin/env bash
# Fills .whl/ with the wheels a GPU machine without network lacks for scripts/gpu_check.sh and the
# GPU benchmark, then checks them. Run here (with PyPI access), carry .whl/ to the GPU machine.
#
#   bash scripts/gpu_wheels.sh            # PYTHON: a python with torch, to build DeepSpeed's wheel
#
# The GPU machine (Python 3.12, torch, transformers, lightning, peft, accelerate, huggingface_hub,
# tokenizers, safetensors, torchmetrics, pyarrow, pandas, xxhash, triton, nvcc, ninja) lacks
# jsonargparse, datasets, deepspeed, trl and liger-kernel; wandb is not needed (the checks run with
# wandb.enabled false, and the package imports wandb only to log an artifact). One version of each
# wheel; every Requires-Dist of each is checked against this set plus the machine's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST=.whl
# The main checkout's .git/info/exclude (shared by worktrees) keeps .whl/ out of git.
EXCLUDE="$(git rev-parse --git-common-dir)/info/exclude"
grep -qxF "/.whl/" "$EXCLUDE" 2>/dev/null || echo "/.whl/" >>"$EXCLUDE"
mkdir -p "$DEST"

# name==version; the binary ones (pydantic-core, msgpack) are cp312 manylinux builds.
WHEELS=(
  jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0   # jsonargparse[signatures]
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19                          # datasets
  fsspec==2026.9.0   # datasets pins fsspec <= 2026.9.0; the machine's may be newer
  hjson==3.1.0 msgpack==1.2.4 py-cpuinfo==9.0.0 einops==0.8.2                # deepspeed's
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  nvidia-ml-py==13.615.71
  trl==1.16.0 liger-kernel==0.8.5                                            # the benchmark
)
DEEPSPEED=0.19.8
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$@"
}
download "${WHEELS[@]}"

# DeepSpeed ships only an sdist. DS_BUILD_OPS=0: a pure-python wheel; its CUDA ops would be compiled
# on first use (nvcc + ninja, minutes), which the checks avoid by training with a torch optimizer
# (model.optimizer: the strategy configs set no DeepSpeed optimizer, so no FusedAdam is built).
if ! ls "$DEST"/deepspeed-"$DEEPSPEED"-*.whl >/dev/null 2>&1; then
  "$PY" -c "import torch" || { echo "PYTHON=$PY has no torch: DeepSpeed's setup.py needs it" >&2; exit 1; }
  DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PY" -m pip wheel -q --no-deps --no-build-isolation \
    --no-binary deepspeed -w "$DEST" "deepspeed==$DEEPSPEED"
fi

# One version of each distribution, and every requirement met by a wheel here or the GPU machine.
"$PY" - "$DEST" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

# What the GPU machine has (docs of the machine) and what those packages pull in themselves; the
# versions where the machine's package list states them, checked against the wheels' requirements.
DEVICE = """torch transformers lightning pytorch-lightning peft accelerate huggingface-hub tokenizers
safetensors torchmetrics pyarrow pandas xxhash triton ninja numpy packaging pyyaml tqdm filelock fsspec
psutil jinja2 typing-extensions regex requests httpx lightning-utilities sympy networkx setuptools""".split()
DEVICE_VERSIONS = {"torch": "2.11.0", "transformers": "5.17.0", "lightning": "2.6.6",
                   "pytorch-lightning": "2.6.6", "accelerate": "1.15.0", "huggingface-hub": "1.33.0",
                   "tokenizers": "0.23.2", "safetensors": "0.8.0", "torchmetrics": "1.9.0",
                   "numpy": "2.5.2", "triton": "3.6.0"}
env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
       "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
folder = Path(sys.argv[1])
wheels = {}
for path in sorted(folder.glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(path.name)
    if name in wheels:
        sys.exit(f"two versions of {name}: {wheels[name][0]} and {version}")
    wheels[name] = (version, path)
have = set(wheels) | {canonicalize_name(n) for n in DEVICE}
missing = []
for name, (version, path) in wheels.items():
    with zipfile.ZipFile(path) as archive:
        meta = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        lines = archive.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        # jsonargparse is used with its `signatures` extra
        extra = "signatures" if name == "jsonargparse" else ""
        if requirement.marker and not requirement.marker.evaluate({**env, "extra": extra}):
            continue
        dep = canonicalize_name(requirement.name)
        if dep not in have:
            missing.append(f"{name} {version} needs {requirement}")
        elif dep in wheels and not requirement.specifier.contains(wheels[dep][0], prereleases=True):
            missing.append(f"{name} {version} needs {requirement}, the wheel is {wheels[dep][0]}")
        elif dep not in wheels and dep in DEVICE_VERSIONS and not requirement.specifier.contains(
            DEVICE_VERSIONS[dep], prereleases=True
        ):
            missing.append(f"{name} {version} needs {requirement}, the GPU machine has {DEVICE_VERSIONS[dep]}")
    print(f"{path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
if missing:
    sys.exit("unmet requirements:\n  " + "\n  ".join(missing))
print(f"{len(wheels)} wheels, every requirement met by a wheel here or the GPU machine's packages")
EOF
# Imports. The wheels are for Python 3.12: a python3.12 without torch (PYTHON312, if there is one)
# imports the modules that need nothing else, the compiled ones included; PYTHON imports the
# torch-side packages from the pure-python wheels, with its own copies of the compiled ones.
PY312="${PYTHON312:-$(command -v python3.12 || true)}"
# (a pyenv shim for a version that is not selected is on PATH but does not run)
if [ -n "$PY312" ] && "$PY312" -c "" 2>/dev/null; then
  rm -rf /tmp/site_check312
  "$PY312" -m pip install -q --no-index --no-deps --target /tmp/site_check312 "$DEST"/*.whl
  # the two of the GPU machine's packages these import (not carried: the machine has them)
  "$PY312" -m pip install -q --no-deps --target /tmp/site_check312/_machine typing_extensions pyyaml
  PYTHONPATH=/tmp/site_check312:/tmp/site_check312/_machine "$PY312" -c "
import importlib
for name in ['jsonargparse', 'docstring_parser', 'typeshed_client', 'dill', 'multiprocess', 'hjson',
             'msgpack._cmsgpack', 'cpuinfo', 'einops', 'pydantic', 'pydantic_core._pydantic_core',
             'annotated_types', 'typing_inspection', 'pynvml']:
    module = importlib.import_module(name)
    assert module.__file__.startswith('/tmp/site_check312/'), module.__file__
print('python3.12: the torch-free modules import from the wheels, compiled ones included')"
else
  echo "no python3.12 (set PYTHON312): the compiled cp312 wheels were not import-checked" >&2
fi
rm -rf /tmp/site_check
ls "$DEST"/*.whl | grep -v -e '-cp312-' -e '-py312-' | xargs "$PY" -m pip install -q --no-index --no-deps \
  --target /tmp/site_check
# PYTHON's own builds (same versions) of the compiled wheels it lacks, kept out of .whl/
"$PY" -m pip download -q --no-deps --only-binary=:all: -d /tmp/site_check_binaries \
  $(ls "$DEST" | grep -e '-cp312-' -e '-py312-' | cut -d- -f1,2 | sed 's/-/==/')
"$PY" -m pip install -q --no-index --no-deps --target /tmp/site_check /tmp/site_check_binaries/*.whl
PYTHONPATH=/tmp/site_check"${PYTHONPATH:+:$PYTHONPATH}" DS_ACCELERATOR=cpu "$PY" -c "
import importlib
for name in ['jsonargparse', 'docstring_parser', 'typeshed_client', 'datasets', 'deepspeed', 'trl',
             'liger_kernel', 'liger_kernel.transformers', 'hjson', 'cpuinfo', 'einops', 'pydantic', 'msgpack',
             'multiprocess', 'dill']:
    module = importlib.import_module(name)
    assert module.__file__.startswith('/tmp/site_check/'), module.__file__
import jsonargparse.typing, lightning.pytorch.cli  # the signatures extra as LightningCLI uses it
from ipo_lightning.distributed import PreferenceDeepSpeedStrategy
PreferenceDeepSpeedStrategy(stage=3)
print('$PY: jsonargparse, datasets, deepspeed, trl, liger_kernel import from the wheels')"
du -ch "$DEST"/*.whl | tail -1 | sed 's/total/wheels in total/'
git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | awk '{printf "%.1fM tracked working tree\n", $1 / 1048576}'
