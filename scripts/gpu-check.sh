#!/usr/bin/env bash
# One-command GPU check (issue 16): parity of lctx's RoPE patches on CUDA in fp32 and bf16, and a long-context
# benchmark of a random-weight ~1B Llama, in under 8 minutes. See the docstring of scripts/gpu_check.py.
#
#   scripts/gpu-check.sh --out "$OUT"        # on the GPU machine, from anywhere
#   scripts/gpu-check.sh --dry               # the same code on CPU at tiny sizes (under a minute)
#
# Unbuffered, so progress lines arrive as they happen on a remote run; exits with gpu_check.py's status
# (0 all passed, 1 a parity check failed, 2 the benchmark crashed). PYTHON picks the interpreter (default python3).
set -euo pipefail
PYTHONUNBUFFERED=1 exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
