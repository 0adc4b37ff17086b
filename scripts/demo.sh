#!/usr/bin/env bash
# The main job, end to end: install what is missing, build the iris example into a
# unikernel, boot it, answer inference requests through it, then compare it with the
# same service as a container (and as a plain process) on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh build
work="${UNIFRAME_DEMO_DIR:-$(mktemp -d)}"
port="${UNIFRAME_DEMO_PORT:-18080}"

echo "== 1. train the iris example (scikit-learn -> ONNX)"
uniframe examples iris "$work"
cp examples/iris/service.yaml "$work/service.yaml"

echo "== 2. build it into a unikernel (trace, pack, boot once to prove it)"
uniframe build "$work/service.yaml"

echo "== 3. boot it as a microVM and ask it"
id=$(uniframe run iris -p "$port:8080" -d)
trap 'uniframe stop "$id" >/dev/null 2>&1 || true; uniframe rm -f "$id" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 300); do curl -sf "localhost:$port/v2/health/ready" >/dev/null && break; sleep 0.2; done
uniframe ps
uniframe infer "http://localhost:$port" iris --data '[[5.1,3.5,1.4,0.2],[6.7,3.0,5.2,2.3]]'
uniframe stop "$id"

echo "== 4. the same service as a container and as a process, side by side"
python3 bench/runtimes_bench.py --runs 1 --only unikernel,container,process
