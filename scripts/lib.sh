# Set-up shared by scripts/run and scripts/test: installs on a Debian or Ubuntu machine what is
# missing, saying what and why before it does, and reuses what is there. Sourced, not run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PATH="$HOME/.cargo/bin:$PATH"
# Tools this project builds or installs for itself live here, outside the work tree.
cache="${XDG_CACHE_HOME:-$HOME/.cache}/weather-pipeline"

say() { printf '\n==> %s\n' "$*" >&2; }
die() { printf '\nerror: %s\n' "$*" >&2; exit 1; }

command -v cargo >/dev/null ||
  die "cargo not found: install the Rust toolchain (rustup) first; everything else is installed here"

# Debian packages: `need PACKAGE WHY CHECK...` queues PACKAGE unless the command CHECK succeeds.
packages=()
reasons=()
need() {
  local package=$1 why=$2
  shift 2
  if ! "$@" >/dev/null 2>&1; then
    packages+=("$package")
    reasons+=("  $package: $why")
  fi
}
has_postgres() { compgen -G '/usr/lib/postgresql/*/bin/postgres' || command -v postgres; }
install_packages() {
  [ ${#packages[@]} -gt 0 ] || return 0
  say "installing Debian packages:"
  printf '%s\n' "${reasons[@]}" >&2
  command -v apt-get >/dev/null ||
    die "no apt-get here (not Debian or Ubuntu): install the packages above with this system's package manager, then run again"
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "installing packages needs root: run as root, or install sudo"
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}"
}

# What building and running the pipeline needs.
need_pipeline_packages() {
  need build-essential "C compiler and make, for the bundled librdkafka" command -v make
  need pkg-config "finds C libraries while building" command -v pkg-config
  need postgresql "the window table and the Iceberg catalog" has_postgres
}

# nisshi (tansu's continuation) with its SQLite storage: the pipeline's Kafka-protocol broker,
# its log on disk. 0.8 is the first release whose log end the consumers can rely on; it needs
# Rust 1.96 or later. Kept in its own root, so that another nisshi on PATH is not taken for it.
nisshi_version=0.8.1
nisshi_rust=1.96

# Prints `+TOOLCHAIN` for the first installed rustup toolchain whose rustc is at least
# $nisshi_rust, or `+` when the default one is; nothing when none is.
nisshi_toolchain() {
  local toolchain version
  for toolchain in "" $(rustup toolchain list 2>/dev/null | awk '{print $1}'); do
    version=$(rustc ${toolchain:++$toolchain} --version 2>/dev/null | awk '{print $2}') || continue
    version=${version%%-*}
    if [ -n "$version" ] && [ "$(printf '%s\n%s\n' "$nisshi_rust" "$version" | sort -V | head -n1)" = "$nisshi_rust" ]; then
      printf '+%s\n' "$toolchain"
      return 0
    fi
  done
}

install_nisshi() {
  local root="$cache/nisshi-$nisshi_version-libsql"
  if [ ! -x "$root/bin/nisshi" ]; then
    local toolchain
    toolchain=$(nisshi_toolchain)
    [ -n "$toolchain" ] ||
      die "building the broker, nisshi $nisshi_version, needs Rust $nisshi_rust or later, and $(rustc --version) is older: \
run 'rustup toolchain install stable' (or any toolchain from $nisshi_rust on), then run again"
    say "building the broker, nisshi $nisshi_version with SQLite storage, into $root with Rust $(rustc ${toolchain%+} --version 2>/dev/null | awk '{print $2}') (it needs $nisshi_rust or later; about 15 minutes on 2 cores, once)"
    # `cargo +TOOLCHAIN`, or plain `cargo` when the default toolchain is new enough.
    cargo ${toolchain%+} install --root "$root" "nisshi@$nisshi_version" --locked \
      --no-default-features --features dynostore,libsql
  fi
  export PATH="$root/bin:$PATH"
}
