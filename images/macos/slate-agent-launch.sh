#!/bin/sh
# Start slate-agent for this VM's one job: read the config, fetch the one-time token,
# hand it over in the environment only, and make it unreadable to the job's steps.
set -eu
conf=${1:-/usr/local/etc/slate/agent.conf}
. "$conf"

token=""
waited=0
while [ -z "$token" ]; do
    if [ -n "${SLATE_TOKEN_FILE:-}" ] && [ -r "$SLATE_TOKEN_FILE" ]; then
        token=$(cat "$SLATE_TOKEN_FILE")
        # One use only: steps run as the same user and must not find it later.
        rm -f "$SLATE_TOKEN_FILE" 2>/dev/null || true
    elif [ -n "${SLATE_TOKEN_COMMAND:-}" ]; then
        token=$(sh -c "$SLATE_TOKEN_COMMAND" 2>/dev/null || true)
    fi
    if [ -z "$token" ]; then
        if [ "$waited" -ge "${SLATE_TOKEN_WAIT:-120}" ]; then
            echo "slate-agent-launch: no job token after ${waited}s" >&2
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    fi
done

fingerprint=${SLATE_FINGERPRINT:-}
if [ -n "${SLATE_FINGERPRINT_FILE:-}" ] && [ -r "$SLATE_FINGERPRINT_FILE" ]; then
    fingerprint=$(cat "$SLATE_FINGERPRINT_FILE")
fi

set -- --connect "$SLATE_CONNECT"
if [ -n "$fingerprint" ]; then
    set -- "$@" --fingerprint "$fingerprint"
fi
if [ -n "${SLATE_HEARTBEAT_MS:-}" ]; then
    set -- "$@" --heartbeat-ms "$SLATE_HEARTBEAT_MS"
fi
SLATE_AGENT_TOKEN=$token exec /usr/local/bin/slate-agent "$@"
