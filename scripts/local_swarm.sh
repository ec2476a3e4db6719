#!/usr/bin/env bash
# A local swarm on loopback: a bootstrap node and two more joining through it, then a
# 64 MiB ping between the two joiners (hash checked), then a clean shutdown.
set -euo pipefail
dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

start() {  # start NAME [flags...]: runs a node, waits for its runtime file
  local name=$1; shift
  shoal node --data-dir "$dir/$name" --listen /ip4/127.0.0.1/tcp/0 --api 127.0.0.1:0 "$@" \
    >"$dir/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do [ -f "$dir/$name/node.json" ] && return 0; sleep 0.1; done
  echo "node $name did not start; its log:" >&2; cat "$dir/$name.log" >&2; exit 1
}
field() { python -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$dir/$1/node.json" "$2"; }

start boot
boot=$(field boot 'd["addrs"][0]')
echo "bootstrap node: $boot"
start alice --bootstrap "$boot"
start bob --bootstrap "$boot"
alice_api=$(field alice 'd["api"]'); bob=$(field bob 'd["peer_id"]')
echo "waiting for alice to find bob through peer exchange..."
for _ in $(seq 1 100); do
  shoal status --api "$alice_api" --json | grep -q "$bob" && break; sleep 0.2
done
shoal status --api "$alice_api"
shoal ping "$bob" --bytes $((64 << 20)) --api "$alice_api"
