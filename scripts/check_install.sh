#!/usr/bin/env bash
# The wheel, installed for real (not editable) beside Hugging Face's `kernels`,
# must take no other package's import names: both import before, and HF's
# package still imports after attn-zoo is uninstalled.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python=${PYTHON:-python3}

"$python" -m pip wheel -qq --no-deps --no-build-isolation -w "$work/dist" . 2>/dev/null \
    || "$python" -m pip wheel -qq --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/attn_zoo-*.whl)
tops=$("$python" -c "import sys, zipfile; print(' '.join(sorted({n.split('/')[0] for n in zipfile.ZipFile(sys.argv[1]).namelist() if not n.split('/')[0].endswith('.dist-info')})))" "$wheel")
[ "$tops" = "attn_zoo" ] || { echo "check_install: the wheel installs top-level names: $tops (want attn_zoo only)"; exit 1; }

"$python" -m venv "$work/venv"
pip="$work/venv/bin/python -m pip"
$pip install -qq --upgrade pip
# The CPU build of torch first, so that no requirement pulls CUDA packages.
$pip install -qq --retries 0 "torch==${TORCH_VERSION:-2.13.0}" --extra-index-url https://download.pytorch.org/whl/cpu
$pip install -qq kernels
$pip install -qq "$wheel"

cd "$work"  # away from the source folders, which would shadow the installed ones
check() {
    "$work/venv/bin/python" -c "$1" || { echo "check_install: failed: $1 ($2)"; exit 1; }
}
check "from kernels import get_kernel; import attn_zoo.kernels, attn_zoo.bench.cli" "both installed"
check "import attn_zoo; assert attn_zoo.__file__.startswith('$work/venv'), attn_zoo.__file__" "installed copy"
"$work/venv/bin/attn-zoo" list >/dev/null
"$work/venv/bin/python" -m attn_zoo.bench list >/dev/null
$pip check
# The peers extra: its pins must leave the installed torch alone, and every peer import.
torch_before=$("$work/venv/bin/python" -c "import torch; print(torch.__version__)")
$pip install -qq "$wheel[peers]"
check "import torch; assert torch.__version__ == '$torch_before', torch.__version__" "peers kept torch $torch_before"
check "import attn_zoo, torch; cpu = torch.device('cpu'); missing = [m for m in attn_zoo.names() if 'peer' in attn_zoo.get(m).impls and attn_zoo.get(m).impl('peer').unavailable(cpu)]; assert not missing, missing" "every peer imports"
$pip check
$pip uninstall -qq -y attn-zoo
check "from kernels import get_kernel" "after uninstalling attn-zoo"
check "import importlib.util as u; assert u.find_spec('attn_zoo') is None" "attn_zoo removed"
echo "check_install: ok ($(basename "$wheel") beside kernels $($work/venv/bin/python -c 'import importlib.metadata as m; print(m.version("kernels"))'))"
