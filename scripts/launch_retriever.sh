#!/usr/bin/env bash
# Launches the CARL retrieval server (Search-R1's POST /retrieve protocol) over a local JSONL corpus.
# Every setting comes from an environment variable with a default; extra arguments are passed to the CLI
# (python -m recipe.carl.search.server --help lists them all), e.g.
#   CORPUS=data/wiki18.jsonl BACKEND=dense ENCODER=intfloat/e5-base-v2 INDEX_TYPE=ivf FP16=1 \
#     QUERY_PREFIX="query: " DOC_PREFIX="passage: " bash scripts/launch_retriever.sh
# (wiki-18, 21M passages, step by step: docs/retriever.md)
# The first start builds the index next to the corpus (<corpus>.<backend>_index/, with a manifest of checksums); later
# starts verify and load it, and rebuild it when the corpus or index settings changed (ON_STALE=error refuses instead).
# Python: $PYTHON if set, else $CARL_VENV/bin/python if CARL_VENV is set (scripts/install_cpu.sh's venv), else the
# python3 on PATH (the active venv or conda environment).
set -euo pipefail
# Relative paths (CORPUS, INDEX_DIR, PORT_FILE, PYTHON) are taken from the caller's directory, not the repository's.
abspath() { if [[ -n "$1" && "$1" != /* ]]; then echo "$PWD/$1"; else echo "$1"; fi; }
CORPUS="$(abspath "${CORPUS:-data/corpus.jsonl}")"
INDEX_DIR="$(abspath "${INDEX_DIR:-}")"
PORT_FILE="$(abspath "${PORT_FILE:-}")"
[[ "${PYTHON:-}" == */* ]] && PYTHON="$(abspath "$PYTHON")"  # a bare name (python3) is looked up on PATH
cd "$(dirname "$0")/.."

# CORPUS (default data/corpus.jsonl): JSONL, one {"id", "contents": "Title\ntext"} per line
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"                       # 0 = pick a free port (written to PORT_FILE if set)
BACKEND="${BACKEND:-bm25}"                 # bm25 | dense
TOPK="${TOPK:-3}"                          # default documents per query (requests may override)
# INDEX_DIR (default: <corpus>.<backend>_index); PORT_FILE: where to write the bound port
ON_STALE="${ON_STALE:-rebuild}"            # rebuild | error
# dense only
ENCODER="${ENCODER:-}"                     # required for dense: sentence-transformers model/path, or hash[:dim] (test)
INDEX_TYPE="${INDEX_TYPE:-flat}"           # flat (exact) | ivf (approximate, needs NPROBE tuning)
FP16="${FP16:-0}"                          # 1 = store vectors as float16 (half the memory)
NPROBE="${NPROBE:-16}"
QUERY_PREFIX="${QUERY_PREFIX:-}"           # e5: "query: "
DOC_PREFIX="${DOC_PREFIX:-}"               # e5: "passage: "
# Encoder device, dense only: cpu (default) | cuda | cuda:N. Not the sentence-transformers default (cuda:0 when there
# is a GPU): on a training node that is the first training GPU. Build a large index on a GPU ahead of training
# (DEVICE=cuda ... --build-only), then serve with the query encoder on the CPU or a GPU outside trainer's set.
DEVICE="${DEVICE:-cpu}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -n "${CARL_VENV:-}" ]]; then PYTHON="$CARL_VENV/bin/python"; else PYTHON="$(command -v python3 || true)"; fi
fi

if [[ -z "$PYTHON" ]] || ! "$PYTHON" -c "import fastapi, uvicorn, bm25s, Stemmer" 2>/dev/null; then
  hint=""
  [[ -x .venv/bin/python ]] && hint=" (scripts/install_cpu.sh's venv is there: PYTHON=.venv/bin/python)"
  echo "error: python '${PYTHON:-python3 (not on PATH)}' cannot import the retriever's packages (fastapi, uvicorn," \
    "bm25s, PyStemmer): activate the environment where carl-verl is installed, or set PYTHON=/path/to/python$hint" >&2
  exit 2
fi
if [[ ! -f "$CORPUS" ]]; then
  echo "error: corpus file not found: $CORPUS (set CORPUS=path/to/corpus.jsonl)" >&2
  exit 2
fi

args=(
  --corpus "$CORPUS"
  --host "$HOST"
  --port "$PORT"
  --backend "$BACKEND"
  --topk "$TOPK"
  --on-stale "$ON_STALE"
  --index-type "$INDEX_TYPE"
  --nprobe "$NPROBE"
  --query-prefix "$QUERY_PREFIX"
  --doc-prefix "$DOC_PREFIX"
)
[[ -n "$INDEX_DIR" ]] && args+=(--index-dir "$INDEX_DIR")
[[ -n "$PORT_FILE" ]] && args+=(--port-file "$PORT_FILE")
[[ -n "$DEVICE" ]] && args+=(--device "$DEVICE")
[[ -n "$ENCODER" ]] && args+=(--encoder "$ENCODER")
[[ "$FP16" == "1" ]] && args+=(--fp16)

exec "$PYTHON" -m recipe.carl.search.server "${args[@]}" "$@"
