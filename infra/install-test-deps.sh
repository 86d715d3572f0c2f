#!/usr/bin/env bash
# Install the Debian packages the tests need: sshd (a loopback "remote" node) and pdsh (DeepSpeed's
# default multi-node launcher) for the launcher tests, and chromium (headless) for the Prefect UI test.
# Idempotent and quiet; does nothing when all are present.
set -euo pipefail

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v pdsh >/dev/null 2>&1 || missing+=(pdsh)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "error: the tests need ${missing[*]}: run 'sudo apt-get install ${missing[*]}' (or run this script as root)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
