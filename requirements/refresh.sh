#!/usr/bin/env bash
# Re-resolve requirements/lock.txt from setup.cfg (+ the test, serve and distributed extras) and requirements/torch.in.
# Run it after changing a dependency in setup.cfg, or to move the whole lock to newer releases; then run
# `bash .ci/run` and commit the lock with the test result in the message.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="$(mktemp -d)/pip-tools"
python3 -m venv "$tools"
"$tools/bin/pip" install --quiet "pip-tools==7.7.0"
"$tools/bin/pip-compile" --quiet --upgrade --extra distributed --extra serve --extra test --strip-extras --no-emit-index-url --no-emit-find-links \
    --output-file requirements/lock.txt setup.cfg requirements/torch.in
# pip-compile writes the wheel it resolved, torch==X+cpu where the CPU build lies on disk. Without the
# local label the same lock takes that CPU wheel here and the platform's default build elsewhere.
sed -i -E 's/^torch==([^+ ]+)\+cpu/torch==\1/' requirements/lock.txt
echo "wrote requirements/lock.txt"
