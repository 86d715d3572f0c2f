#!/usr/bin/env bash
# Install what the tests need from Debian: sshd (a loopback "remote" node) and pdsh (DeepSpeed's default
# multi-node launcher) for the launcher tests, Slurm and munge for the two-node Slurm cluster the tests
# start (lejepa.testing.slurm_cluster; its nodes node1 and node2 must resolve: they are added to
# /etc/hosts at 127.0.0.1), and chromium (headless) for the Prefect UI test.
# Idempotent and quiet; does nothing when all are present.
set -euo pipefail

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v pdsh >/dev/null 2>&1 || missing+=(pdsh)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] || missing+=(slurm-wlm)
[ -x /usr/sbin/munged ] || missing+=(munge)
hosts_ok=true
getent hosts node1 >/dev/null && getent hosts node2 >/dev/null || hosts_ok=false
[ ${#missing[@]} -eq 0 ] && $hosts_ok && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "error: the tests need ${missing[*]:-node1 and node2 in /etc/hosts}: run this script as root" >&2
    exit 1
fi
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
$hosts_ok || echo "127.0.0.1 node1 node2  # the test Slurm cluster's nodes (lejepa infra/install-test-deps.sh)" >> /etc/hosts
