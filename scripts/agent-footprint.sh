#!/usr/bin/env bash
# Measures the release swell-agent binary (stripped size) and its idle memory:
# the agent connected to a local Mosquitto, subscribed, holding a verified key
# list, with nothing to do. Prints size, VmRSS and VmHWM.
# Usage: scripts/agent-footprint.sh [seconds-idle]   (needs mosquitto)
set -euo pipefail
idle="${1:-10}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# Separately: built together with `swell`, feature unification would add the
# simulator to the agent binary.
cargo build --release -j2 -p swell >/dev/null
cargo build --release -j2 -p swell-agent >/dev/null
bin="$root/target/release/swell-agent"
swell="$root/target/release/swell"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
max_inflight_messages 0
max_queued_messages 1000000
CONF
mosq=$(command -v mosquitto || echo /usr/sbin/mosquitto)
"$mosq" -c "$work/mosquitto.conf" >/dev/null 2>&1 &
sleep 0.5
"$swell" keys gen root --out "$work/root.key" >/dev/null
"$swell" keys gen release --out "$work/release.key" >/dev/null
"$swell" keys gen coordinator --out "$work/coord.key" >/dev/null
"$swell" keys list --root "$work/root.key" --release "$work/release.key.pub" \
  --release-threshold 1 --coordinator "$work/coord.key.pub" --out "$work/keys.bin" >/dev/null
root_hex=$("$swell" keys show "$work/root.key.pub" | awk '/public key/ {print $NF; exit}')
mosquitto_pub -p "$port" -r -t swell/v1/fleet/default/keys -f "$work/keys.bin"
cat > "$work/agent.toml" <<CONF
device_id = "footprint-1"
hardware = "x86-64"
broker = "mqtt://127.0.0.1:$port"
state_dir = "$work/state"
[trust]
roots = ["$root_hex"]
CONF
"$bin" --config "$work/agent.toml" run 2>"$work/agent.log" &
pid=$!
sleep "$idle"
grep -q "key list accepted" "$work/agent.log" || { echo "agent did not accept the key list:"; cat "$work/agent.log"; exit 1; }
size=$(stat -c %s "$bin")
rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
hwm=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
echo "swell-agent (release, stripped): $size bytes ($((size / 1024)) KiB)"
echo "idle after ${idle}s, connected: VmRSS ${rss} KiB, peak VmHWM ${hwm} KiB"
