#!/usr/bin/env bash
# MeCeFO across hosts with torchrun: one lighthouse, one replica group of NPROC ranks per host.
# README, "Running on a cluster", explains each step.
#
#   on the coordinating host:    LIGHTHOUSE=10.0.0.1:29510 examples/multihost_torchrun.sh lighthouse
#   on the host of group I:      LIGHTHOUSE=10.0.0.1:29510 examples/multihost_torchrun.sh group I
#
# A group that dies (a rank crashed, a node was lost) is restarted by torchrun up to MAX_RESTARTS
# times and heals from a live group; on a replacement node, run the same "group I" command there.
# A lighthouse that dies: run the same "lighthouse" command again within --lighthouse-wait (300 s):
# it reloads the job's ledger from STATE_DIR and the groups, which waited, carry on.
# "group I" exits 0 only when the job's last step is committed (torchrun passes the group's status on).
#
# Settings (environment):
#   LIGHTHOUSE   HOST:PORT of the lighthouse, on the cluster's private network (required;
#                the lighthouse and the job store on PORT+1 are unauthenticated)
#   NUM_GROUPS   replica groups in the job (default 4)
#   NPROC        ranks per group (default 2)
#   HOST_ADDR    this host's private address: what the group binds and advertises
#                (default: the first address `hostname -I` prints)
#   MASTER_PORT  torchrun's port on this host (default 29400 + INDEX: groups sharing a host never collide)
#   MAX_RESTARTS torchrun restarts of this group (default 3)
#   RUN_DIR      metrics, checkpoints (default runs/cluster)
#   STATE_DIR    the lighthouse's journal of the job store (default runs/lighthouse-state; one per job)
#   TRAIN_ARGS   training options, identical for every group (default: a small example)
#   GLOO_SOCKET_IFNAME  the private interface's name, when gloo should not pick it from the host name
set -euo pipefail

role=${1:?usage: $0 lighthouse | group INDEX}
: "${LIGHTHOUSE:?set LIGHTHOUSE=HOST:PORT (the lighthouse host private address)}"
NUM_GROUPS=${NUM_GROUPS:-4}
NPROC=${NPROC:-2}
HOST_ADDR=${HOST_ADDR:-$(hostname -I | awk '{print $1}')}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RUN_DIR=${RUN_DIR:-runs/cluster}
STATE_DIR=${STATE_DIR:-runs/lighthouse-state}
TRAIN_ARGS=${TRAIN_ARGS:---preset tiny --steps 2000 --policy mecefo --checkpoint-every 200}

case "$role" in
  lighthouse)
    exec mecefo-lighthouse --bind "$LIGHTHOUSE" --min-replicas 1 --heartbeat-timeout 5 --state-dir "$STATE_DIR"
    ;;
  group)
    group=${2:?usage: $0 group INDEX}
    MASTER_PORT=${MASTER_PORT:-$((29400 + group))}
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of options
    exec python -m torch.distributed.run --nnodes 1 --nproc-per-node "$NPROC" \
      --master-addr "$HOST_ADDR" --master-port "$MASTER_PORT" --max-restarts "$MAX_RESTARTS" \
      -m mecefo.group --lighthouse "$LIGHTHOUSE" --group "$group" --groups "$NUM_GROUPS" \
      --advertise "$HOST_ADDR" --run-dir "$RUN_DIR" $TRAIN_ARGS
    ;;
  *)
    echo "usage: $0 lighthouse | group INDEX" >&2
    exit 2
    ;;
esac
