#!/usr/bin/env bash
# A short streamed guidellm benchmark against a local `pdserve serve` (issue #27's check that a
# vLLM user's benchmark tool works unmodified against pdserve's OpenAI API).
#
# guidellm lives in its own venv, outside the repository's lock, so installing it cannot change
# the project's environment: ${GUIDELLM_VENV:-$HOME/.cache/pdserve/guidellm-venv}, created on the
# first run with pinned guidellm==0.8.1 and CPU torch==2.13.0 (so pip pulls no CUDA torch).
# The script then
#   1. starts `pdserve serve` from the repo's venv (${PDSERVE_PYTHON:-.venv/bin/python}) on free
#      ports with OMP_NUM_THREADS=1, the default model unless SERVE_ARGS says otherwise
#      (default SERVE_ARGS: "--prefill 0 --decode 1", one colocated worker), waits for /health;
#   2. gives guidellm the served model's HF tokenizer directory (the directory pdserve's loader
#      resolves: for the default GGUF model, its converted copy under the pdserve cache), so it
#      runs offline;
#   3. runs guidellm: streamed /v1/chat/completions, synthetic prompts of PROMPT_TOKENS (64) and
#      OUTPUT_TOKENS (32, ignore_eos), STREAMS (2) concurrent streams, REQUESTS (16) requests;
#      prints guidellm's summary and writes its JSON report to ${OUT_DIR:-/tmp/pdserve-guidellm};
#   4. stops the server (also on error or Ctrl-C).
#
#     bash loadtest/guidellm_bench.sh
#     REQUESTS=24 STREAMS=4 SERVE_ARGS="--load-format dummy --preset tiny-llama" bash loadtest/guidellm_bench.sh
#
# Exit status: guidellm's, or non-zero if the server did not come up. Any errored request shows
# in guidellm's summary (its "Err" columns).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GUIDELLM_VENV="${GUIDELLM_VENV:-$HOME/.cache/pdserve/guidellm-venv}"
PDSERVE_PYTHON="${PDSERVE_PYTHON:-$REPO/.venv/bin/python}"
SERVE_ARGS="${SERVE_ARGS:---prefill 0 --decode 1}"
REQUESTS="${REQUESTS:-16}"
STREAMS="${STREAMS:-2}"
PROMPT_TOKENS="${PROMPT_TOKENS:-64}"
OUTPUT_TOKENS="${OUTPUT_TOKENS:-32}"
OUT_DIR="${OUT_DIR:-/tmp/pdserve-guidellm}"
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-300}"

export OMP_NUM_THREADS=1
export PYTHONPATH="$REPO/protos:$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ ! -x "$GUIDELLM_VENV/bin/guidellm" ]; then
    echo "installing guidellm into $GUIDELLM_VENV" >&2
    python3 -m venv "$GUIDELLM_VENV"
    "$GUIDELLM_VENV/bin/pip" install -q --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
    "$GUIDELLM_VENV/bin/pip" install -q guidellm==0.8.1 torch==2.13.0
fi

free_port() {
    "$PDSERVE_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
GRPC_PORT="$(free_port)"
HTTP_PORT="$(free_port)"
while [ "$HTTP_PORT" = "$GRPC_PORT" ]; do HTTP_PORT="$(free_port)"; done
URL="http://127.0.0.1:$HTTP_PORT"

# The tokenizer pdserve serves the model with (no model hub offline: guidellm needs a directory).
# shellcheck disable=SC2086
TOKENIZER_DIR="$("$PDSERVE_PYTHON" - $SERVE_ARGS <<'EOF'
import argparse, sys
from services.engine.loader import resolve
p = argparse.ArgumentParser()
p.add_argument("--model"); p.add_argument("--load-format", default="auto"); p.add_argument("--preset")
p.add_argument("--tokenizer")
a, _ = p.parse_known_args(sys.argv[1:])
src = resolve(a.model, a.load_format, a.preset, tokenizer=a.tokenizer, weights=False)
if src.tokenizer_dir is None:
    sys.exit("the served model has no tokenizer: pass --tokenizer in SERVE_ARGS")
print(src.tokenizer_dir)
EOF
)"

mkdir -p "$OUT_DIR"
SERVER_LOG="$OUT_DIR/pdserve.log"
echo "pdserve serve $SERVE_ARGS on $URL (log: $SERVER_LOG)" >&2
# shellcheck disable=SC2086
"$PDSERVE_PYTHON" -m services.cli.main serve --port "$GRPC_PORT" --http-port "$HTTP_PORT" \
    $SERVE_ARGS >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!
stop_server() {
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap stop_server EXIT

deadline=$((SECONDS + STARTUP_TIMEOUT))
until "$PDSERVE_PYTHON" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "$URL/health" 2>/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "pdserve exited before it was healthy; its log:" >&2; tail -30 "$SERVER_LOG" >&2; exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "pdserve not healthy after ${STARTUP_TIMEOUT}s" >&2; exit 1
    fi
    sleep 1
done

# guidellm runs without the repo on its path: the repo's `kernels/` package would shadow the
# `kernels` package transformers imports in guidellm's venv; guidellm warns about any GUIDELLM_*
# variable it does not know.
(cd "$OUT_DIR" && env -u PYTHONPATH -u GUIDELLM_VENV "$GUIDELLM_VENV/bin/guidellm" run \
    --backend "kind=openai_http,target=$URL,request_format=/v1/chat/completions,stream=true" \
    --tokenizer "kind=huggingface_auto,model=$TOKENIZER_DIR" \
    --data "kind=synthetic_text,prompt_tokens=$PROMPT_TOKENS,output_tokens=$OUTPUT_TOKENS" \
    --profile "kind=concurrent,streams=$STREAMS" \
    --constraint "kind=max_requests,count=$REQUESTS" \
    --output kind=console --output "kind=json,path=$OUT_DIR/benchmarks.json" \
    --disable-progress)
