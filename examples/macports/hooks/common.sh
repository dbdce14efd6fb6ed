# Shared by the example hooks: how to reach a guest over ssh and start the agent in it.
# Sourced, not run. Settings come from [pool.exec.env] in slate.toml.

: "${GUEST_USER:=admin}"                      # account in the base image
: "${GUEST_SSH_KEY:=/etc/slate/guest_ed25519}" # its public half is in the image
# The base image's host key, as a known_hosts line `* ssh-ed25519 AAAA…` (every clone of
# the image has it; the pattern matches whatever address the clone gets). Clones are
# never trusted on first use.
: "${GUEST_KNOWN_HOSTS:=/etc/slate/guest_known_hosts}"
: "${GUEST_AGENT:=/usr/local/bin/slate-agent}" # agent preinstalled in the image
: "${GUEST_WORKDIR:=/Users/admin/workspace}"   # must match the pool's `workdir`
: "${NFS_SERVER:=}"                           # host exporting the caches' sources

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

guest_ssh() {
    ip=$1; shift
    ssh -i "$GUEST_SSH_KEY" -o BatchMode=yes -o IdentitiesOnly=yes \
        -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$GUEST_KNOWN_HOSTS" \
        -o GlobalKnownHostsFile=/dev/null -o ConnectTimeout=5 -o LogLevel=ERROR \
        "$GUEST_USER@$ip" "$@"
}

# Retries until sshd in the fresh guest answers.
wait_for_ssh() {
    ip=$1
    for _ in $(seq 1 60); do
        guest_ssh "$ip" true 2>/dev/null && return 0
        sleep 2
    done
    log "no ssh on $ip after 120s"
    return 1
}

# Copies the job's source tree (if slate exported one) into the guest's workdir.
copy_source() {
    ip=$1
    [ -n "${SLATE_SOURCE:-}" ] || return 0
    tar -C "$SLATE_SOURCE" -cf - . \
        | guest_ssh "$ip" "mkdir -p '$GUEST_WORKDIR' && tar -C '$GUEST_WORKDIR' -xf -"
}

# Mounts the pool's caches ($SLATE_CACHES: NAME<TAB>MODE<TAB>SOURCE<TAB>TARGET lines) in
# the guest: `ro` as a read-only NFS mount; `overlay` as the original proposal's union:
# the read-only NFS mirror below, a per-job writable disk image on top. The overlay dies
# with the clone, so new distfiles are not promoted back from exec workers.
mount_caches() {
    ip=$1
    [ -n "${SLATE_CACHES:-}" ] || return 0
    tab=$(printf '\t')
    printf '%s\n' "$SLATE_CACHES" | while IFS=$tab read -r name mode source target; do
        [ -n "$name" ] || continue
        case $source in *:*) export_path=$source ;; *) export_path="$NFS_SERVER:$source" ;; esac
        case $mode in
        ro)
            guest_ssh "$ip" "sudo mkdir -p '$target' && sudo mount -t nfs -o ro,resvport '$export_path' '$target'" </dev/null
            ;;
        overlay)
            guest_ssh "$ip" "set -e
                sudo mkdir -p '$target'
                sudo mount -t nfs -o ro,union,resvport '$export_path' '$target'
                hdiutil create -quiet -o /tmp/$name-overlay.dmg -size 20g -fs HFS+J -volname $name-overlay
                disk=\$(hdiutil attach -nomount /tmp/$name-overlay.dmg | awk '/Apple_HFS/ {print \$1}')
                sudo mount -t hfs -o rw,union \"\$disk\" '$target'" </dev/null
            ;;
        *) log "cache $name: unknown mode $mode"; return 1 ;;
        esac
    done
}

# Starts the agent in the guest, dialing back over TLS and pinning the server's
# certificate. The token goes through ssh's stdin, so it is in no command line on either
# side; the agent removes it from its environment at start.
start_agent() {
    ip=$1
    printf '%s\n' "$SLATE_AGENT_TOKEN" | guest_ssh "$ip" \
        "read -r t; SLATE_AGENT_TOKEN=\$t nohup '$GUEST_AGENT' --connect '$SLATE_AGENT_URL' \
         --fingerprint '$SLATE_AGENT_FINGERPRINT' </dev/null >/tmp/slate-agent.log 2>&1 &"
}
