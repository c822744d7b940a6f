#!/usr/bin/env bash
# The agent's footprint: per target, the stripped size of swell-agent (profile
# `agent`) and its resident memory when idle — connected to a local Mosquitto,
# subscribed, holding a verified key list, nothing to do — natively on x86_64
# and under qemu-user for ARM (those RSS figures include the emulator). Then the
# same for Debian's mender-client (`mender daemon`, idle against an unreachable
# server) as a reference. Prints a Markdown table.
# Usage: cross/footprint.sh   (TARGETS="..." and IDLE_SECS=N to change)
set -euo pipefail
cd "$(dirname "$0")/.."
idle="${IDLE_SECS:-10}"
read -r -a targets <<< "${TARGETS:-x86_64-unknown-linux-gnu aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf}"

work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

cargo build -q -p swell >&2
swell=target/debug/swell
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\nmax_queued_messages 1000000\n' "$port" > "$work/mosquitto.conf"
mosq=$(command -v mosquitto || echo /usr/sbin/mosquitto)
"$mosq" -c "$work/mosquitto.conf" >/dev/null 2>&1 & pids+=($!)
sleep 0.5
"$swell" keys gen root --out "$work/root.key" >/dev/null
"$swell" keys gen release --out "$work/release.key" >/dev/null
"$swell" keys gen coordinator --out "$work/coord.key" >/dev/null
"$swell" keys list --root "$work/root.key" --release "$work/release.key.pub" \
  --release-threshold 1 --coordinator "$work/coord.key.pub" --out "$work/keys.bin" >/dev/null
root_hex=$("$swell" keys show "$work/root.key.pub" | awk '/public key/ {print $NF; exit}')
mosquitto_pub -p "$port" -r -t swell/v1/fleet/default/keys -f "$work/keys.bin"

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }

echo "| program | target | stripped size | idle RSS | peak RSS | note |"
echo "|---|---|---|---|---|---|"
for t in "${targets[@]}"; do
  bin=$(cross/build.sh "$t" | tail -n 1)
  case "$t" in
    x86_64-*) runner=(); note="native" ;;
    aarch64-*-musl) runner=(qemu-aarch64); note="qemu-aarch64 (RSS includes the emulator)" ;;
    aarch64-*) runner=(qemu-aarch64 -L /usr/aarch64-linux-gnu); note="qemu-aarch64 (RSS includes the emulator)" ;;
    armv7-*-musleabihf) runner=(qemu-arm); note="qemu-arm (RSS includes the emulator)" ;;
    armv7-*) runner=(qemu-arm -L /usr/arm-linux-gnueabihf); note="qemu-arm (RSS includes the emulator)" ;;
  esac
  printf 'device_id = "fp-%s"\nhardware = "board"\nbroker = "mqtt://127.0.0.1:%s"\nstate_dir = "%s"\n[trust]\nroots = ["%s"]\n' \
    "${t%%-*}" "$port" "$work/state-$t" "$root_hex" > "$work/$t.toml"
  "${runner[@]}" "$bin" --config "$work/$t.toml" run 2>"$work/$t.log" & pid=$!; pids+=("$pid")
  sleep "$idle"
  if ! grep -q "key list accepted" "$work/$t.log"; then
    echo "error: the $t agent did not come up:" >&2; cat "$work/$t.log" >&2; exit 1
  fi
  size=$(stat -c %s "$bin")
  echo "| swell-agent | $t | $((size / 1024)) KiB | $(rss "$pid") KiB | $(hwm "$pid") KiB | $note |"
  kill "$pid"
done

if ! command -v mender >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mender-client >/dev/null 2>&1 || true
fi
if command -v mender >/dev/null 2>&1; then
  mkdir -p "$work/mender"
  printf '{"ServerURL": "https://127.0.0.1:9", "UpdatePollIntervalSeconds": 1800, "InventoryPollIntervalSeconds": 28800, "RetryPollIntervalSeconds": 300}\n' > "$work/mender/mender.conf"
  printf 'device_type=board\n' > "$work/mender/device_type"
  mender --config "$work/mender/mender.conf" --data "$work/mender" daemon >"$work/mender.log" 2>&1 & pid=$!; pids+=("$pid")
  sleep "$idle"
  if kill -0 "$pid" 2>/dev/null; then
    size=$(stat -c %s "$(command -v mender)")
    echo "| mender-client $(mender --version 2>/dev/null | head -n 1 | awk '{print $1}') (Debian) | x86_64 | $((size / 1024)) KiB | $(rss "$pid") KiB | $(hwm "$pid") KiB | \`mender daemon\`, idle, server unreachable |"
  else
    echo "| mender-client (Debian) | x86_64 | - | - | - | daemon exited: $(tail -n 1 "$work/mender.log") |"
  fi
else
  echo "| mender-client | - | - | - | - | not installed (apt-get install mender-client) |"
fi
