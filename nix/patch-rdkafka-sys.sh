# Lets rdkafka-sys build its bundled librdkafka from a read-only vendored copy with no
# /usr/bin/env, as in the Nix sandbox. Used by nix/packages.nix (crane's
# overrideVendorCargoPackage) and by scripts/check-nix-build, which emulates that build here.
#   sh nix/patch-rdkafka-sys.sh VENDORED_CRATE_DIR
# - build.rs copies the sources with `cp -a`, which keeps the store's read-only modes, so
#   ./configure could not write into its copy: make the copy writable once it is made.
# - configure and lds-gen.py start with `#!/usr/bin/env …`: name their interpreters outright.
set -eu
crate=$1

sed -i 's|run_command_or_fail(".", "cp", &\["-a", "librdkafka/.", &out_dir\]);|&\n        run_command_or_fail(".", "chmod", \&["-R", "u+w", \&out_dir]);|' "$crate/build.rs"
grep -q '"chmod", &\["-R", "u+w", &out_dir\]' "$crate/build.rs" || {
  echo "patch-rdkafka-sys: build.rs no longer copies with cp -a; check the patch against this rdkafka-sys" >&2
  exit 1
}

for script in configure lds-gen.py; do
  file="$crate/librdkafka/$script"
  first=$(head -n 1 "$file")
  case "$first" in
    '#!/usr/bin/env '*)
      program=${first#'#!/usr/bin/env '}
      path=$(command -v "$program") || {
        echo "patch-rdkafka-sys: $program (for $script) is not on PATH" >&2
        exit 1
      }
      sed -i "1s|.*|#!$path|" "$file"
      ;;
  esac
done
