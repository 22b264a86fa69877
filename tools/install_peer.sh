#!/usr/bin/env bash
# llm-compressor and its pinned dependencies in a virtual environment of their own (default
# .peer/), so that tools/bench_peer.py can run the peer without touching streamq's environment.
#   bash tools/install_peer.sh [DEST]
# TORCH sets the torch requirement: the CPU build by default; on a GPU machine, e.g. TORCH=torch.
set -euo pipefail
dest=${1:-.peer}
python3 -m venv "$dest"
"$dest/bin/pip" install -q "${TORCH:-torch==2.13.0}"
"$dest/bin/pip" install -q llmcompressor==0.14.0.1
"$dest/bin/python" -c "import llmcompressor; print('llm-compressor', llmcompressor.__version__, 'in $dest')"
