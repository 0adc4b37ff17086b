#!/usr/bin/env bash
# The main job: install, build the example iris model, serve it, answer inference requests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh build
work="${UNIFRAME_DEMO_DIR:-$(mktemp -d)}"
uniframe examples iris "$work"
port=18080
uniframe serve "$work/iris.onnx" --name iris --port "$port" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "localhost:$port/v2/health/ready" >/dev/null && break; sleep 0.1; done
uniframe infer "http://localhost:$port" iris --data '[[5.1,3.5,1.4,0.2],[6.7,3.0,5.2,2.3]]'
