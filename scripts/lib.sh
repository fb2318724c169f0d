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

# tansu 0.6 with its SQLite storage: the pipeline's Kafka-protocol broker, its log on disk.
# Kept in its own root, so that a tansu without SQLite storage on PATH is not taken for it.
install_tansu() {
  local root="$cache/tansu-0.6.0-libsql"
  if [ ! -x "$root/bin/tansu" ]; then
    say "building the broker, tansu 0.6.0 with SQLite storage, into $root (about 15 minutes on 2 cores, once)"
    cargo install --root "$root" tansu@0.6.0 --locked --no-default-features --features dynostore,libsql
  fi
  export PATH="$root/bin:$PATH"
}
