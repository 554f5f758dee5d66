#!/usr/bin/env bash
# Creates .bench/tq-venv, the separate venv that benchmarks/peers/transferqueue_peer.py runs in.
#
# TransferQueue 0.1.11 brings its own dependencies (tensordict, pyzmq, hydra, an unpinned ray[default]),
# so it stays out of the project's .venv. torch goes in first and pinned: transferqueue does not need a
# particular torch, and an unpinned one would let pip pick a multi-GB CUDA build; on CPU machines
# torch==2.13.0 resolves to the 2.13.0+cpu wheel. Idempotent: steps already done are skipped.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
venv=.bench/tq-venv

# Whether the venv has distribution $1 at version $2 (a local suffix such as +cpu is ignored).
have() {
    "$venv/bin/python" - "$1" "$2" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version

sys.exit(version(sys.argv[1]).split("+")[0] != sys.argv[2])
EOF
}

mkdir -p .bench
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
have torch 2.13.0 || "$venv/bin/pip" install torch==2.13.0
have transferqueue 0.1.11 || "$venv/bin/pip" install transferqueue==0.1.11
"$venv/bin/python" -c "import torch, transfer_queue; print('tq-venv ready: torch', torch.__version__, \
'transferqueue', transfer_queue.__version__)"
