#!/usr/bin/env bash
# Retrain shoal-tiny from scratch with 3 `shoal train` peers on loopback, each on its own
# third of the corpus; prints each peer's held-out loss and state hash (docs/training.md).
#
#   scripts/retrain_tiny3.sh [WORKDIR] [ROUNDS] [CORPUS]
#
# Run it again with more ROUNDS to resume from the checkpoints in WORKDIR.
set -euo pipefail
WORK=${1:-/tmp/shoal-retrain}
ROUNDS=${2:-12}
DATA=${3:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data/tinyshakespeare.txt}
[ -f "$DATA" ] || { echo "corpus $DATA not found: pass its path as the third argument" >&2; exit 2; }
mkdir -p "$WORK" && cd "$WORK"
ARGS=(train --run tiny3 --data "$DATA" --scratch --shards 3 --batch 8 --seq 256
      --inner-steps 50 --rounds "$ROUNDS" --lr 2e-3 --outer-lr 0.7 --outer-momentum 0.5
      --listen /ip4/127.0.0.1/tcp/0 --swarm retrain)
export OMP_NUM_THREADS=1
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
python -m shoal.node.cli "${ARGS[@]}" --shard 0 --min-peers 3 --data-dir p0 >p0.out 2>p0.err &
pids+=($!)
until grep -q -- "--bootstrap" p0.err 2>/dev/null; do
    kill -0 "${pids[0]}" 2>/dev/null || { cat p0.err >&2; exit 1; }
    sleep 1
done
ADDR=$(grep -o -- "--bootstrap [^ ]*" p0.err | head -1 | cut -d' ' -f2)
echo "founder at $ADDR; training $ROUNDS rounds (progress in $WORK/p*.err)"
for i in 1 2; do
    python -m shoal.node.cli "${ARGS[@]}" --shard "$i" --bootstrap "$ADDR" --data-dir "p$i" \
        >"p$i.out" 2>"p$i.err" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
trap - EXIT
cat p0.out p1.out p2.out
exit $status
