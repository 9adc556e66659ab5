#!/usr/bin/env bash
# Two "machines" on one: two network namespaces joined by a veth pair, one rank in each,
# MPI forced onto TCP over that link (no shared memory between the ranks' transports).
# Runs 2 ranks of `nbalex train` on tiny data and compares them with one process.
# Needs root (ip netns). Not part of `make test`.
#
#   sudo bench/netns_two_hosts.sh            # from the repository root
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="$ROOT/.venv/bin/python"
MPIEXEC="$ROOT/.venv/bin/mpiexec"
WORK=$(mktemp -d)
A=nbalex-a; B=nbalex-b

cleanup() {
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$A"; ip netns add "$B"
ip link add veth_a type veth peer name veth_b
ip link set veth_a netns "$A"; ip link set veth_b netns "$B"
ip -n "$A" addr add 10.77.0.1/24 dev veth_a; ip -n "$B" addr add 10.77.0.2/24 dev veth_b
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set veth_a up; ip -n "$B" link set veth_b up
if command -v ping >/dev/null; then ip netns exec "$A" ping -c 1 -W 2 10.77.0.2 >/dev/null; fi

# tiny packed data
"$ROOT/.venv/bin/nbalex" synth "$WORK/images" --classes 3 --train-per-class 16 \
    --val-per-class 5 >/dev/null
"$ROOT/.venv/bin/nbalex" pack "$WORK/images/train" "$WORK/train.h5" --size 24 --workers 1 >/dev/null 2>&1
"$ROOT/.venv/bin/nbalex" pack "$WORK/images/val" "$WORK/val.h5" --size 24 --workers 1 \
    --classes-from "$WORK/train.h5" >/dev/null 2>&1

# mpiexec runs in namespace A as if on host 10.77.0.1 and starts its daemon on "host"
# 10.77.0.2 through a launch agent that enters namespace B where ssh would log in; the
# ranks then reach each other (and the daemons) only over the veth link, over TCP.  Each
# namespace gets its own host name (unshare --uts), so MPI sees two nodes.
cat >"$WORK/agent.sh" <<EOF
#!/usr/bin/env bash
host=\$1; shift
ns=\$([ "\$host" = 10.77.0.1 ] && echo $A || echo $B)
exec ip netns exec "\$ns" unshare --uts bash -c "hostname \$ns; \$*"
EOF
chmod +x "$WORK/agent.sh"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
ARGS=(--data "$WORK/train.h5" --val "$WORK/val.h5" --model "$ROOT/tests/configs/cli-tiny.toml"
      --epochs 2 --batch-size 8 --backend reference --workers 0 --no-progress)
start=$(date +%s.%N)
ip netns exec "$A" unshare --uts "$ROOT/.venv/bin/python" -c \
    "import os, socket, sys; socket.sethostname('$A'); os.execv(sys.argv[1], sys.argv[1:])" \
    "$MPIEXEC" -n 2 --host 10.77.0.1:1,10.77.0.2:1 \
    --prtemca plm_ssh_agent "$WORK/agent.sh" --prtemca oob_tcp_if_include 10.77.0.0/24 \
    --mca btl tcp,self --mca btl_tcp_if_include 10.77.0.0/24 \
    -x PATH -x OMPI_ALLOW_RUN_AS_ROOT -x OMPI_ALLOW_RUN_AS_ROOT_CONFIRM \
    "$PY" -m nbalex train "${ARGS[@]}" --out "$WORK/net"
end=$(date +%s.%N)
"$PY" -m nbalex train "${ARGS[@]}" --out "$WORK/one" >/dev/null 2>&1
"$PY" - "$WORK" <<'EOF'
import sys, numpy as np
from nbalex import checkpoint
a = checkpoint.load(f"{sys.argv[1]}/net/checkpoint.h5")["params"]
b = checkpoint.load(f"{sys.argv[1]}/one/checkpoint.h5")["params"]
worst = max(float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in b)
print(f"2 ranks over TCP (veth) vs one process: worst per-tensor max|a-b|/max|b| = {worst:.2e}")
sys.exit(0 if worst < 1e-5 else 1)
EOF
echo "2-rank job over the veth link: $("$PY" -c "print(round($end - $start, 1))") s"
