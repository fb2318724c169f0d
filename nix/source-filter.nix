# What of the repository goes into the Nix builds: cargo sources, plus every file compiled in
# with include_str! (the SQL migrations, Trino's configuration that `pipeline` writes) and the
# test helpers. scripts/check-nix-eval checks that each include_str! target is kept.
{ lib, craneLib }:
path: type:
(craneLib.filterCargoSources path type)
|| lib.hasSuffix ".sql" path
|| lib.hasInfix "/trino/etc/" path
|| lib.hasSuffix ".py" path
|| lib.hasSuffix "requirements.txt" path
