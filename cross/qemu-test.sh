#!/usr/bin/env bash
# ARM for real: builds swell-agent for aarch64 (static musl) and armv7 (gnu),
# then runs the agent's slots install scenario (manifest → download → install
# → probation → committed, and a failing release rolled back) with the ARM
# binary under qemu-user against the broker and artifact server of the host
# test. On armv7 (32-bit) it also checks an artifact longer than 4 GiB (a
# sparse file) is hashed and length-checked correctly.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in qemu-aarch64 qemu-arm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user >&2
    else
      echo "error: $tool is missing: apt-get install qemu-user" >&2; exit 1
    fi
  fi
done

run_scenario() {
  local target=$1 runner=$2 bin
  bin=$(cross/build.sh "$target" | tail -n 1)
  echo "--- $target under $runner: $(stat -c %s "$bin") bytes"
  SWELL_AGENT_BIN="$PWD/$bin" SWELL_AGENT_RUNNER="$runner" \
    cargo test -q -p swell-agent --test agent_install agent_installs_with_slots_then_rolls_back_a_failing_release
}

run_scenario aarch64-unknown-linux-musl "qemu-aarch64"
run_scenario armv7-unknown-linux-gnueabihf "qemu-arm -L /usr/arm-linux-gnueabihf"

echo "--- armv7: an artifact of 4 GiB + 1 byte (sparse) is hashed and length-checked"
big_dir=$(mktemp -d)
trap 'rm -rf "$big_dir"' EXIT
big="$big_dir/big.img"
truncate -s 4294967296 "$big"
printf 'x' >> "$big"
len=$(stat -c %s "$big")
digest=$(sha256sum "$big" | cut -d' ' -f1)
arm=target/armv7-unknown-linux-gnueabihf/agent/swell-agent
qemu-arm -L /usr/arm-linux-gnueabihf "$arm" verify "$big" --sha256 "$digest" --length "$len"
if qemu-arm -L /usr/arm-linux-gnueabihf "$arm" verify "$big" --sha256 "$digest" --length 1 2>/dev/null; then
  echo "error: a length wrapped to 32 bits was accepted" >&2; exit 1
fi
echo "ARM scenarios passed"
