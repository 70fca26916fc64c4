#!/usr/bin/env bash
# Provision a VM (or any Debian 12 host) to run egress-agent as a systemd
# service. Idempotent: a second run changes nothing that is already right.
#
#   provision.sh                         as root, in the VM (Vagrant runs it)
#   provision.sh --dry-run --root DIR    anywhere, any user: write every file it
#                                        would install under DIR and print the
#                                        commands instead of running them
#   PROVISION_ROOT=DIR provision.sh      the same as --dry-run --root DIR
#   provision.sh --role gateway          the gateway role (EGRESS_AGENT_ROLE=gateway)
#
# Steps:
#   1. the repository's own set-up, `run setup` (Debian packages, kernel
#      headers for bcc, the .venv), exactly as README.md does it;
#   2. the role's demo policy (node: vagrant/policy.yaml; gateway:
#      vagrant/gateway-policy.yaml) as /etc/egress-agent/policy.yaml, only if
#      that file does not exist: an edited policy is never replaced;
#   3. `egress-agent check` on the policy in place: a bad one stops here, with
#      every problem as file:line:col, before the service is touched;
#   4. the units deploy/systemd/egress-agent.service and its boot guard
#      egress-agent-guard.service in /etc/systemd/system (each replaced when
#      it differs);
#   5. systemctl daemon-reload, try-restart (only when a unit changed, so a
#      running agent picks it up: a restart keeps the rules in place, see
#      README.md), enable --now; then wait for "ready:".
#
# The repository is EGRESS_AGENT_REPO (or --repo DIR); by default the checkout
# this script is in, or /opt/egress-agent when it runs from elsewhere (Vagrant
# uploads a copy to /tmp). For real the repository must be /opt/egress-agent:
# the unit runs /opt/egress-agent/.venv/bin/egress-agent.
set -euo pipefail

UNIT_NAME=egress-agent.service
UNIT_PATH=/etc/systemd/system/$UNIT_NAME
GUARD_NAME=egress-agent-guard.service
GUARD_PATH=/etc/systemd/system/$GUARD_NAME
POLICY_PATH=/etc/egress-agent/policy.yaml
VM_REPO=/opt/egress-agent
READY_TIMEOUT=${PROVISION_READY_TIMEOUT:-60}  # seconds

usage() {
    sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -f "$here/../run" ] && [ -f "$here/../pyproject.toml" ]; then
    default_repo=$(cd "$here/.." && pwd)
else
    default_repo=$VM_REPO
fi
repo=${EGRESS_AGENT_REPO:-$default_repo}
root=${PROVISION_ROOT:-/}
role=${EGRESS_AGENT_ROLE:-node}
dry_run=0
[ "$root" != / ] && dry_run=1

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --root) root=${2:?--root needs a folder}; shift ;;
        --root=*) root=${1#--root=} ;;
        --repo) repo=${2:?--repo needs a folder}; shift ;;
        --repo=*) repo=${1#--repo=} ;;
        --role) role=${2:?--role needs node or gateway}; shift ;;
        --role=*) role=${1#--role=} ;;
        -h|--help) usage; exit 0 ;;
        *) echo "provision: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

case "$role" in
    node) demo_policy=vagrant/policy.yaml ;;
    gateway) demo_policy=vagrant/gateway-policy.yaml ;;
    *) echo "provision: unknown role '$role': node (the default) or gateway" >&2; exit 2 ;;
esac

if [ "$dry_run" = 1 ]; then
    if [ "$root" = / ] || [ -z "$root" ]; then
        echo "provision: --dry-run writes its files under a scratch folder: add --root DIR" >&2
        exit 2
    fi
    mkdir -p "$root"
    root=$(cd "$root" && pwd)
else
    if [ "$(id -u)" != 0 ]; then
        echo "provision: needs root (packages, /etc, systemd): try sudo, or --dry-run --root DIR" >&2
        exit 1
    fi
    if [ "$(cd "$repo" && pwd -P)" != "$(cd "$VM_REPO" 2>/dev/null && pwd -P)" ]; then
        echo "provision: the unit runs $VM_REPO/.venv/bin/egress-agent, but the repository" \
            "is $repo: put it at $VM_REPO (the Vagrantfile syncs it there)" >&2
        exit 1
    fi
fi
repo=$(cd "$repo" && pwd)

say() { echo "provision: $*"; }

# A command on the machine; in a dry run only printed, one "would run:" line each.
run() {
    if [ "$dry_run" = 1 ]; then
        echo "would run: $*"
    else
        say "running: $*"
        "$@"
    fi
}

# Where a path of the target system is written: itself, or under the dry run's root.
target() { printf '%s%s' "${root%/}" "$1"; }

# install_file SRC DEST MODE replace|keep -- sets `changed` to 1 when DEST was written.
changed=0
install_file() {
    local src=$1 dest=$2 mode=$3 existing=$4 at
    at=$(target "$dest")
    changed=0
    if [ ! -f "$src" ]; then
        echo "provision: $src is missing: is $repo a complete checkout of egress-agent?" >&2
        exit 1
    fi
    if [ -e "$at" ]; then
        if [ "$existing" = keep ]; then
            say "$dest exists: kept as it is (delete it to get the demo policy again)"
            return 0
        fi
        if cmp -s "$src" "$at"; then
            say "$dest is up to date"
            return 0
        fi
    fi
    install -d -m 0755 "$(dirname "$at")"
    install -m "$mode" "$src" "$at"
    changed=1
    say "installed $dest (from ${src#"$repo"/})"
}

# The agent logs "egress-agent: INFO ready: ..." once its rules and proxy are up;
# Type=simple alone would call it started as soon as the process runs.
wait_ready() {
    local id
    if [ "$dry_run" = 1 ]; then
        echo "would wait: up to ${READY_TIMEOUT}s for 'ready:' in journalctl -u egress-agent"
        return 0
    fi
    for _ in $(seq "$READY_TIMEOUT"); do
        id=$(systemctl show -p InvocationID --value "$UNIT_NAME")
        if [ -n "$id" ] && journalctl -q -o cat "_SYSTEMD_INVOCATION_ID=$id" | grep -q 'ready:'; then
            say "egress-agent is running:"
            journalctl -q -o cat "_SYSTEMD_INVOCATION_ID=$id" | grep 'ready:' | tail -n 1
            return 0
        fi
        sleep 1
    done
    echo "provision: egress-agent did not report ready in ${READY_TIMEOUT}s; its journal:" >&2
    journalctl -q --no-pager -u egress-agent -n 30 >&2 || true
    exit 1
}

[ "$dry_run" = 1 ] && say "dry run: files under $root, commands printed, nothing else changed"

run "$repo/run" setup

install_file "$repo/$demo_policy" "$POLICY_PATH" 0644 keep
if ! run "$repo/.venv/bin/egress-agent" check "$POLICY_PATH"; then
    echo "provision: $POLICY_PATH is not valid (problems above): fix it and provision again" >&2
    exit 2
fi

install_file "$repo/deploy/systemd/$GUARD_NAME" "$GUARD_PATH" 0644 replace
unit_changed=$changed
install_file "$repo/deploy/systemd/$UNIT_NAME" "$UNIT_PATH" 0644 replace
[ "$changed" = 1 ] && unit_changed=1

run systemctl daemon-reload
if [ "$unit_changed" = 1 ]; then
    run systemctl try-restart "$UNIT_NAME"
fi
run systemctl enable --now "$UNIT_NAME"
wait_ready
if [ "$dry_run" = 1 ]; then
    say "dry run done: the files are under $root"
else
    say "done: systemctl status egress-agent; audit records in /var/log/egress-agent/audit.jsonl"
fi
