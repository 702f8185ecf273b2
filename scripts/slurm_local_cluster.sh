#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests and trying run_all.sh.
#   sudo bash scripts/slurm_local_cluster.sh start    # install (Debian) if needed, configure, start
#   sudo bash scripts/slurm_local_cluster.sh status
#   sudo bash scripts/slurm_local_cluster.sh stop
# Runs as root: slurmctld, slurmd and munged from Debian's packages, no systemd
# needed. The node gets this machine's real CPUs and (slightly less) memory.
set -euo pipefail
CONF_DIR=/etc/slurm
STATE=/var/spool/slurm-local
LOGS=/var/log/slurm-local

need_root() { [ "$(id -u)" = 0 ] || { echo "error: run as root (it writes $CONF_DIR and starts daemons)" >&2; exit 2; }; }

install_packages() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
     || ! command -v munged >/dev/null; then
    echo "[slurm] installing slurmctld slurmd slurm-client munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
  fi
}

start_munge() {
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then mungekey --create --force >/dev/null 2>&1 || \
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 400 /etc/munge/munge.key
  chmod 711 /run/munge
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged --force    # --force: a stale socket from a killed run is fine
  fi
  for _ in $(seq 1 20); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.5; done
  munge -n | unmunge >/dev/null || { echo "error: munge does not work (see /var/log/munge/munged.log)" >&2; exit 1; }
}

write_conf() {
  local host node cpus mem
  host=$(hostname -s)
  node=$(slurmd -C | head -n 1)                        # NodeName=... CPUs=... RealMemory=...
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<< "$node")
  mem=$(( mem * 90 / 100 ))                             # leave room for the OS
  node=$(sed "s/RealMemory=[0-9]*/RealMemory=$mem/" <<< "$node")
  mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$LOGS"
  cat > "$CONF_DIR/slurm.conf" <<CONF
# Written by scripts/slurm_local_cluster.sh: a one-node test cluster.
ClusterName=monolocal
SlurmctldHost=$host
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
JobRequeue=1
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MinJobAge=3600
$node State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  # Debian's slurmd also wants a cgroup.conf only when cgroup plugins are used: none here.
}

start() {
  need_root
  install_packages
  start_munge
  write_conf
  # -c: start clean, forgetting jobs of an earlier (possibly killed) cluster.
  pgrep -x slurmctld >/dev/null || slurmctld -c
  pgrep -x slurmd >/dev/null || slurmd -c
  for _ in $(seq 1 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "[slurm] cluster up: $(sinfo -h -o '%P %D %T %c CPUs %m MB')"
      return 0
    fi
    sleep 1
  done
  echo "error: the node did not become idle; see $LOGS" >&2
  sinfo >&2 || true
  exit 1
}

stop() {
  need_root
  scontrol shutdown >/dev/null 2>&1 || true
  for d in slurmd slurmctld; do pkill -x "$d" 2>/dev/null || true; done
  for _ in $(seq 1 20); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.5; done
  echo "[slurm] stopped (munged left running)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo && squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
