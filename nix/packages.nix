# The daemons built with crane (one shared dependency build), their OCI images, the checks, and
# the `pipeline` app with the backbone on its PATH.
{ pkgs, crane, src }:
let
  inherit (pkgs) lib;
  craneLib = crane.mkLib pkgs;

  daemonNames = [
    "logging-server"
    "weather-client"
    "window-aggregator"
    "iceberg-sink"
    "dashboard"
    "query-server"
    "pipeline"
  ];

  source = lib.cleanSourceWith {
    inherit src;
    filter = import ./source-filter.nix { inherit lib craneLib; };
  };

  # rdkafka-sys builds the bundled librdkafka from the vendored, read-only sources with
  # `cp -a` and `#!/usr/bin/env bash`: nix/patch-rdkafka-sys.sh makes that work in the sandbox
  # (the same patch is tried outside Nix by scripts/check-nix-build).
  cargoVendorDir = craneLib.vendorCargoDeps {
    src = source;
    overrideVendorCargoPackage =
      p: drv:
      if p.name == "rdkafka-sys" then
        drv.overrideAttrs (old: {
          nativeBuildInputs = (old.nativeBuildInputs or [ ]) ++ [ pkgs.python3 ];
          postInstall = (old.postInstall or "") + ''
            sh ${./patch-rdkafka-sys.sh} "$out"
          '';
        })
      else
        drv;
  };

  commonArgs = {
    src = source;
    inherit cargoVendorDir;
    strictDeps = true;
    # librdkafka is built from rdkafka-sys's bundled sources.
    nativeBuildInputs = with pkgs; [ pkg-config perl python3 ];
    buildInputs = with pkgs; [ zlib ];
  };

  cargoArtifacts = craneLib.buildDepsOnly (commonArgs // { pname = "weather-pipeline-deps"; });

  daemon =
    name:
    craneLib.buildPackage (
      commonArgs
      // {
        inherit cargoArtifacts;
        pname = name;
        cargoExtraArgs = "--locked -p ${name}";
        # The tests need PostgreSQL, brokers and a browser: they run in `checks.nextest`
        # (unit tests) and in CI (everything).
        doCheck = false;
        meta.mainProgram = name;
      }
    );

  daemons = lib.genAttrs daemonNames daemon;

  all = pkgs.symlinkJoin {
    name = "weather-pipeline";
    paths = lib.attrValues daemons;
  };

  image =
    name:
    pkgs.dockerTools.buildLayeredImage {
      name = "weather-pipeline/${name}";
      tag = "latest";
      contents = [
        daemons.${name}
        pkgs.cacert
        pkgs.tzdata
      ];
      config = {
        Entrypoint = [ "${daemons.${name}}/bin/${name}" ];
        User = "65534:65534";
        Env = [
          "SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt"
          "TZDIR=${pkgs.tzdata}/share/zoneinfo"
        ];
      };
    };

  images = lib.listToAttrs (
    map (name: lib.nameValuePair "oci-${name}" (image name)) (lib.remove "pipeline" daemonNames)
  );

  pipelineApp = pkgs.writeShellApplication {
    name = "pipeline";
    # The daemons, PostgreSQL and Apache Kafka (started in KRaft mode, its log in the state
    # directory) are found on PATH.
    runtimeInputs = [
      all
      pkgs.postgresql
      pkgs.apacheKafka
    ];
    text = ''exec ${all}/bin/pipeline "$@"'';
  };
in
{
  inherit daemons images all pipelineApp;

  checks = {
    inherit all;
    clippy = craneLib.cargoClippy (
      commonArgs
      // {
        inherit cargoArtifacts;
        cargoClippyExtraArgs = "--workspace --all-targets -- -D warnings";
      }
    );
    fmt = craneLib.cargoFmt { src = source; };
    # Unit tests only: the integration tests start real services the sandbox does not have.
    nextest = craneLib.cargoNextest (
      commonArgs
      // {
        inherit cargoArtifacts;
        cargoNextestExtraArgs = "--workspace --lib";
      }
    );
  };
}
