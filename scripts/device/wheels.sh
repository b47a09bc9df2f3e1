#!/bin/bash
# Download, on this machine, the wheels a lent GPU machine lacks for memlm, its bench peers and its server
# (it has torch, numpy, safetensors, tokenizers, transformers; nothing can be installed there
# from the internet). Run from the repository root; .whl/ must be git-ignored
# (echo /.whl/ >> .git/info/exclude), then pass carry [".whl"] to the device and start its command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl tomli-w tyro docstring-parser typeguard shtab rich markdown-it-py mdurl pygments \
  x-transformers einops einx loguru torch-einops-utils frozendict \
  fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn h11 click \
  httpx httpcore anyio sniffio idna certifi
ls .whl
