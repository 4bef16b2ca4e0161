#!/usr/bin/env bash
# Run the test suite; pytest's exit code 5 ("no tests collected") is a failure here, said plainly.
set -u
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: the suite is missing or misconfigured" >&2
  exit 1
fi
exit "$rc"
