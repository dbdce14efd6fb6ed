#!/usr/bin/env bash
# slate demo: install what a fresh Debian/Ubuntu machine lacks, then build a real pull
# request end to end on the embedded defaults (SQLite, sandbox provider, a Debian image):
# signed webhook -> plan -> fresh sandbox -> agent -> live log -> commit statuses.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEMO=${SLATE_DEMO_DIR:-/var/lib/slate-demo}
SUITE=${SLATE_DEMO_SUITE:-bookworm}
MIRROR=${SLATE_DEMO_MIRROR:-http://deb.debian.org/debian}

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "installing system packages (runc, debootstrap, git, curl, openssl)"
"$ROOT/scripts/install-deps.sh"

say "building slate and the static agent"
cd "$ROOT"
cargo build --release -p slate-cli
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
"$ROOT/scripts/build-agent.sh" "$TARGET/release/slate-agent"
SLATE="$TARGET/release/slate"

mkdir -p "$DEMO"
IMAGE="$DEMO/images/$SUITE"
if [ ! -x "$IMAGE/bin/sh" ]; then
  say "building the default image: debootstrap $SUITE (minbase + make), once"
  rm -rf "$IMAGE.tmp"
  debootstrap --variant=minbase --include=make "$SUITE" "$IMAGE.tmp" "$MIRROR"
  rm -rf "$IMAGE.tmp/var/cache/apt/archives/"*.deb
  mv "$IMAGE.tmp" "$IMAGE"
fi

say "making a demo repository with a pull request"
REPO="$DEMO/hello.git"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
rm -rf "$REPO"
git init -q --bare -b master "$REPO"
git -C "$WORK" init -q -b master
git -C "$WORK" config user.email demo@example.com
git -C "$WORK" config user.name "slate demo"
cat > "$WORK/Makefile" <<'MK'
hello: hello.sh
	cp hello.sh hello && chmod +x hello
check: hello
	./hello | grep -q "Hello, slate"
	@echo "all checks passed"
MK
printf '#!/bin/sh\necho "Hello, world"\n' > "$WORK/hello.sh"
git -C "$WORK" add -A && git -C "$WORK" commit -qm "hello"
git -C "$WORK" push -q "$REPO" master
BASE=$(git -C "$WORK" rev-parse HEAD)
git -C "$WORK" checkout -q -b changes
printf '#!/bin/sh\necho "Hello, slate"\n' > "$WORK/hello.sh"
git -C "$WORK" commit -qam "greet slate"
HEAD=$(git -C "$WORK" rev-parse HEAD)
git -C "$WORK" push -q "$REPO" changes "changes:refs/pull/2/head"

say "writing the configuration"
SECRET=$(openssl rand -hex 20)
printf '%s' "$SECRET" > "$DEMO/webhook-secret"
printf 'demo-token' > "$DEMO/github-token"
chmod 600 "$DEMO/webhook-secret" "$DEMO/github-token"
rm -rf "$DEMO/data" "$DEMO/statuses.jsonl" "$DEMO"/*.addr
cat > "$DEMO/slate.toml" <<TOML
[server]
listen = "127.0.0.1:0"
data_dir = "$DEMO/data"

[github]
api_url = "GITHUB_URL"
webhook_secret_file = "$DEMO/webhook-secret"
token_file = "$DEMO/github-token"

[[repo]]
name = "slate-demo/hello"
url = "$REPO"
pipeline = "default"
branches = ["master"]

[[pool]]
name = "$SUITE"
provider = "sandbox"
image = "$IMAGE"
max_jobs = 2
limits = { memory = "1GiB", pids = 512, timeout = "10m" }

[[pipeline]]
name = "default"
pools = ["$SUITE"]
steps = [
  { name = "build", run = "make hello && make check", timeout = "5m" },
  { name = "deploy", run = "echo deploying", on = ["push"] },
]
TOML

say "starting a local stand-in for GitHub's status API and slate"
"$SLATE" fake-github --record "$DEMO/statuses.jsonl" --addr-file "$DEMO/github.addr" &
FAKE=$!
for _ in $(seq 100); do [ -s "$DEMO/github.addr" ] && break; sleep 0.1; done
sed -i "s#GITHUB_URL#http://$(cat "$DEMO/github.addr")#" "$DEMO/slate.toml"
"$SLATE" check-config --config "$DEMO/slate.toml"
SLATE_LOG=warn "$SLATE" serve --config "$DEMO/slate.toml" --addr-file "$DEMO/slate.addr" &
SERVER=$!
trap 'kill $SERVER $FAKE 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do [ -s "$DEMO/slate.addr" ] && break; sleep 0.1; done
URL="http://$(cat "$DEMO/slate.addr")"
export SLATE_SERVER="$URL"

say "sending a signed pull_request webhook (GitHub's real payload, shas rewritten)"
PAYLOAD="$DEMO/pull_request.json"
sed -e "s#Codertocat/Hello-World#slate-demo/hello#g" \
    -e "s#ec26c3e57ca3a959ca5aad62de7213c562f8c821#$HEAD#g" \
    -e "s#f95f852bd8fca8fcc58a9a2d6c842781e32a215e#$BASE#g" \
    "$ROOT/tests/fixtures/github-webhooks/pull_request/opened.payload.json" > "$PAYLOAD"
SIG=$(openssl dgst -sha256 -hmac "$SECRET" -hex < "$PAYLOAD" | sed 's/^.*= //')
curl -sS -X POST "$URL/hooks/github" \
  -H "Content-Type: application/json" -H "X-GitHub-Event: pull_request" \
  -H "X-GitHub-Delivery: demo-$(date +%s%N)" -H "X-Hub-Signature-256: sha256=$SIG" \
  --data-binary @"$PAYLOAD"
echo

say "following the job's log live (slate logs 1 --follow)"
for _ in $(seq 100); do curl -sf "$URL/api/v1/jobs/1" >/dev/null && break; sleep 0.1; done
"$SLATE" logs 1 --follow

say "result"
"$SLATE" jobs 1
STATE=$(curl -sf "$URL/api/v1/jobs/1" | sed -n 's/.*"state":"\([a-z_]*\)".*/\1/p')
sleep 0.5
echo
echo "commit statuses GitHub would have received ($DEMO/statuses.jsonl):"
cat "$DEMO/statuses.jsonl"
echo
echo "log: $DEMO/data/logs/1.log    (or: SLATE_SERVER=$URL $SLATE logs 1)"
[ "$STATE" = "succeeded" ]
