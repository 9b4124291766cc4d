#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before `bash .ci/gpu_course.sh` on the GPU machine, which has no network.
# It fills two folders that git ignores and that the device call carries (`carry: [".whl", ".gpu-data"]`):
#
#   .whl/       wheels for Python 3.12 / manylinux x86-64 of what the GPU machine lacks (papermill, nbclient,
#               nbformat, ipykernel, jupyter_client, ipywidgets, IPython, ... and their dependencies), one
#               version each, the versions of the tested stack; packages the GPU machine already has (torch,
#               numpy, matplotlib, tqdm, pyyaml, requests, ... see PREINSTALLED) are left out so that their
#               preinstalled builds stay in charge;
#   .gpu-data/  a copy of the full CIFAR-10 training split as JPEG (../shared/data/cifar10-train-jpeg.tar.gz),
#               from which gpu_course.sh builds torchvision's on-disk layout there.
#
#     bash .ci/gpu_prepare.sh            # both;  PIP=/path/to/pip to choose the pip that downloads
# The total must stay well under the 64 MiB the device call carries (checked below: at most 40 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-$(command -v pip3 || command -v pip)}
JPEG_TAR=${JPEG_TAR:-../shared/data/cifar10-train-jpeg.tar.gz}
[ -f "$JPEG_TAR" ] || JPEG_TAR=/work/shared/data/cifar10-train-jpeg.tar.gz

# What the notebooks need beyond the GPU machine's image, at the tested stack's versions.
WANTED="papermill==2.7.0 nbclient==0.11.0 nbformat==5.11.1 ipykernel==7.4.0 jupyter_client==8.10.0
        jupyter_core==5.9.1 ipywidgets==8.1.9 ipython==9.18.1 traitlets==5.16.1 comm==0.2.3"
# Python packages of the GPU machine's image (device README, KINDS.md): never carried, never shadowed.
PREINSTALLED="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
 charset-normalizer click cloudpickle colorama contourpy cycler filelock fonttools frozenlist fsspec h11 httpcore
 httpx idna jinja2 kiwisolver markupsafe matplotlib multidict numpy packaging pillow pip pluggy propcache psutil
 pygments pyparsing python-dateutil pyyaml requests rich setuptools six sympy mpmath networkx torch torchvision
 tqdm triton typing-extensions urllib3 wheel yarl zipp pytest iniconfig"

rm -rf .whl && mkdir -p .whl .gpu-data
"$PIP" download --quiet --dest .whl --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any $WANTED
for whl in .whl/*.whl; do
  name=$(basename "$whl" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
  for pre in $PREINSTALLED; do
    if [ "$name" = "$pre" ]; then rm "$whl"; break; fi
  done
done
# One version of each (two would stop the install there).
dups=$(ls .whl | cut -d- -f1 | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
[ -z "$dups" ] || { echo "two versions of: $dups" >&2; exit 1; }

cp "$JPEG_TAR" .gpu-data/cifar10-train-jpeg.tar.gz
wheels=$(du -sk .whl | cut -f1); data=$(du -sk .gpu-data | cut -f1)
echo "$(ls .whl | wc -l) wheels, $((wheels / 1024)) MiB in .whl/; $((data / 1024)) MiB in .gpu-data/"
[ $((wheels + data)) -le $((40 * 1024)) ] || { echo "more than 40 MiB to carry: too much" >&2; exit 1; }
