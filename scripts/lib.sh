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

nisshi_root="$cache/nisshi-$nisshi_version-libsql"

# Starts building the broker in the background when it is missing, so that the workspace build
# can run beside it (each leaves a core idle at times: linking, build scripts); wait_nisshi
# waits for it. Its target directory is kept until it succeeds, so an interrupted build resumes.
start_nisshi() {
  nisshi_pid=
  [ ! -x "$nisshi_root/bin/nisshi" ] || return 0
  local toolchain
  toolchain=$(nisshi_toolchain)
  [ -n "$toolchain" ] ||
    die "building the broker, nisshi $nisshi_version, needs Rust $nisshi_rust or later, and $(rustc --version) is older: \
run 'rustup toolchain install stable' (or any toolchain from $nisshi_rust on), then run again"
  mkdir -p "$cache"
  nisshi_log="$cache/nisshi-$nisshi_version-build.log"
  say "building the broker, nisshi $nisshi_version with SQLite storage, in the background into $nisshi_root with Rust $(rustc ${toolchain%+} --version 2>/dev/null | awk '{print $2}') (it needs $nisshi_rust or later; once; log: $nisshi_log)"
  # `cargo +TOOLCHAIN`, or plain `cargo` when the default toolchain is new enough.
  # At opt-level 1: a fifth less to compile than at the release profile's 3 (CPU time), which
  # brings a first run's dashboard under 25 minutes on 2 cores, for a front door about 10-17%
  # slower (README, "The broker").
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1 cargo ${toolchain%+} install --root "$nisshi_root" "nisshi@$nisshi_version" --locked \
    --no-default-features --features dynostore,libsql \
    --target-dir "$cache/nisshi-$nisshi_version-target" >"$nisshi_log" 2>&1 &
  nisshi_pid=$!
  # A failed or interrupted script stops the build with it.
  trap '[ -z "${nisshi_pid:-}" ] || kill "$nisshi_pid" 2>/dev/null || true' EXIT
}

wait_nisshi() {
  if [ -n "${nisshi_pid:-}" ]; then
    wait "$nisshi_pid" || {
      tail -n 30 "$nisshi_log" >&2
      die "building the broker failed (above, the end of $nisshi_log)"
    }
    nisshi_pid=
    rm -rf "$cache/nisshi-$nisshi_version-target"
  fi
  export PATH="$nisshi_root/bin:$PATH"
}

# The daemons `pipeline` runs; scripts/run builds these and nothing else (not the test kit, not
# the benchmark), in two sets: the daemons that do without the Iceberg table, then the three that
# read or write it (Arrow, Parquet, iceberg; DataFusion for the query-server), most of the build.
daemons_first=(pipeline logging-server weather-client dashboard)
daemons_later=(window-aggregator iceberg-sink query-server)

# A line per stage of a run, with the time it took and the time since the start.
run_started=$SECONDS
stage_name=
stage_started=$SECONDS
minutes() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
stage_end() {
  [ -z "$stage_name" ] ||
    printf '    %s took %s (%s since the start)\n' "$stage_name" "$(minutes $((SECONDS - stage_started)))" \
      "$(minutes $((SECONDS - run_started)))" >&2
  stage_name=
}
# stage NAME [EXPECTED]: ends the stage before and starts NAME.
stage() {
  stage_end
  stage_name=$1
  stage_started=$SECONDS
  say "$1${2:+ (expected: $2)}"
}
