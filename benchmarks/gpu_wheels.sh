#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git) the Python 3.12 wheels that
# benchmarks/gpu_check.sh installs on a GPU machine without network: the
# project's dependencies missing from the lent H200's image (../.library's
# device KINDS.md lists what it has), and their own missing needs. Run it here
# (with network), then carry .whl in the device call.
#
#   bash benchmarks/gpu_wheels.sh      # ~15 wheels, ~11 MB
#
# The set was worked out by `pip download` of the project's dependencies for
# cp312 and removing what the image already holds (numpy, protobuf, etils,
# absl-py, pyarrow, requests, psutil, wrapt, ...: carrying those would shadow
# the image's versions). promise has no wheel on PyPI: it is built here
# (pure Python). Checked on CPython 3.12 here: with these wheels and the image's
# packages, tensorflow_datasets / grain / array_record / ml_collections /
# tensorboardX import and tfds.data_source is there.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl  # one version of each: a stale wheel breaks the install there
WHEELS=(
  ml_collections==1.1.0 tensorboardX==2.6.5
  tensorflow-datasets==4.9.10 grain==0.2.18 array_record==0.8.6
  dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 docstring-parser==0.18.0
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 termcolor==3.3.0
  toml==0.10.2 portpicker==1.6.0
)
python3 -m pip wheel -q --no-deps -w .whl promise==2.3
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
ls .whl
du -sh .whl
