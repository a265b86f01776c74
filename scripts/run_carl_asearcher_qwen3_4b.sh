#!/usr/bin/env bash
# The paper's main setting (arXiv 2512.04949 v3, Table 2: Qwen3-4B, max 10 actions; CARL N0=8, N=16): ASearcher-base
# questions, the paper's action space (search, access, read, answer) over a local retriever of the 2018 Wikipedia
# dump with pages. scripts/run_carl_qwen3_4b.sh with ACTION_SPACE=paper; every setting of run_carl_qwen7b.sh applies.
# Before it (docs/pages.md):
#   python -m data_preprocess.asearcher_base --input ASearcher-Base-35k.jsonl --action-space paper \
#       --output $HOME/data/asearcher_paper/train.parquet
#   python -m data_preprocess.qa_test_sets ... --action-space paper --output $HOME/data/asearcher_paper/val.parquet
#   python -m recipe.carl.search.server --corpus wiki-18.jsonl --pages --backend dense --encoder intfloat/e5-base-v2 \
#       --query-prefix "query: " --doc-prefix "passage: " --port 8000
set -xeuo pipefail
export ACTION_SPACE=${ACTION_SPACE:-paper}
export TRAIN_FILE=${TRAIN_FILE:-$HOME/data/asearcher_paper/train.parquet}
export VAL_FILE=${VAL_FILE:-$HOME/data/asearcher_paper/val.parquet}
export EXPERIMENT=${EXPERIMENT:-carl_n0${N0:-8}_qwen3_4b_asearcher_paper}
exec bash "$(dirname "$0")/run_carl_qwen3_4b.sh" "$@"
