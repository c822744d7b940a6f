#!/usr/bin/env bash
# Builds swell-agent for TARGET here, without Docker: the Rust target from
# rustup and Debian's cross gcc (for linking, and for ring's C/assembly).
# Usage: cross/build.sh TARGET [extra cargo args]
# Targets: aarch64-unknown-linux-musl (static; preferred), aarch64-unknown-linux-gnu,
#          armv7-unknown-linux-gnueabihf, armv7-unknown-linux-musleabihf (when
#          rustup offers it), x86_64-unknown-linux-gnu.
# Prints the path of the stripped binary on the last line.
set -euo pipefail
target="${1:?usage: cross/build.sh TARGET [cargo args]}"
shift
cd "$(dirname "$0")/.."

case "$target" in
  aarch64-unknown-linux-gnu|aarch64-unknown-linux-musl)
    gcc=aarch64-linux-gnu-gcc; pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
  armv7-unknown-linux-gnueabihf|armv7-unknown-linux-musleabihf)
    gcc=arm-linux-gnueabihf-gcc; pkgs=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
  x86_64-unknown-linux-gnu)
    gcc=cc; pkgs=() ;;
  *) echo "error: unsupported target $target" >&2; exit 2 ;;
esac

if ! command -v "$gcc" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2
  else
    echo "error: $gcc is missing: apt-get install ${pkgs[*]}" >&2
    exit 1
  fi
fi
rustup target add "$target" >&2

if [ "$gcc" != cc ]; then
  upper=$(echo "$target" | tr 'a-z-' 'A-Z_')
  lower=$(echo "$target" | tr '-' '_')
  export "CARGO_TARGET_${upper}_LINKER=$gcc"
  export "CC_${lower}=$gcc"
  export "AR_${lower}=${gcc%-gcc}-ar"
fi

cargo build --profile agent -p swell-agent --target "$target" "$@" >&2
bin="target/$target/agent/swell-agent"
file "$bin" >&2 || true
echo "$bin"
