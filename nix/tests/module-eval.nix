# Evaluates nix/module.nix with lib.evalModules alone, without nixpkgs' packages or NixOS: the
# NixOS options the module sets are declared here with the names and types nixpkgs gives them,
# and no freeform types, so a misspelt option fails. scripts/check-nix-module renders the
# systemd units of each scenario below and checks them.
#   nix eval --json --impure --expr 'import nix/tests/module-eval.nix { lib = …; }'
{ lib }:
let
  inherit (lib) mkOption types;

  # A stand-in for a package: what lib.getExe and types.package need of one.
  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    meta.mainProgram = name;
  };
  daemons = [ "logging-server" "weather-client" "window-aggregator" "iceberg-sink" "dashboard" "query-server" "pipeline" ];
  self.packages.x86_64-linux = lib.genAttrs daemons fakePackage;

  unitAtom = types.oneOf [ types.bool types.int types.str types.path ];
  # nixos/lib/systemd-unit-options.nix: a [Unit] or [Service] entry, or a list of them.
  unitSection = types.attrsOf (types.either unitAtom (types.listOf unitAtom));
  # pkgs.formats.toml's value type (pkgs/pkgs-lib/formats.nix), the freeform type of Garage's
  # settings.
  tomlValue =
    types.nullOr (
      types.oneOf [
        types.bool
        types.int
        types.float
        types.str
        types.path
        (types.attrsOf tomlValue)
        (types.listOf tomlValue)
      ]
    )
    // {
      description = "TOML value";
    };

  # The NixOS options the module touches (nixos/modules/system/boot/systemd.nix, …/firewall.nix,
  # services/databases/postgresql.nix, services/misc/apache-kafka.nix, services/web-servers/minio.nix).
  nixosOptions = {
    options = {
      # nixos/modules/misc/assertions.nix
      assertions = mkOption {
        type = types.listOf types.unspecified;
        internal = true;
        default = [ ];
      };
      warnings = mkOption {
        type = types.listOf types.str;
        internal = true;
        default = [ ];
      };
      systemd.services = mkOption {
        default = { };
        type = types.attrsOf (
          types.submodule {
            options = {
              description = mkOption { type = types.str; default = ""; };
              overrideStrategy = mkOption {
                type = types.enum [ "asDropinIfExists" "asDropin" ];
                default = "asDropinIfExists";
              };
              wantedBy = mkOption { type = types.listOf types.str; default = [ ]; };
              requiredBy = mkOption { type = types.listOf types.str; default = [ ]; };
              wants = mkOption { type = types.listOf types.str; default = [ ]; };
              requires = mkOption { type = types.listOf types.str; default = [ ]; };
              after = mkOption { type = types.listOf types.str; default = [ ]; };
              before = mkOption { type = types.listOf types.str; default = [ ]; };
              environment = mkOption { type = types.attrsOf (types.nullOr unitAtom); default = { }; };
              path = mkOption { type = types.listOf types.package; default = [ ]; };
              script = mkOption { type = types.lines; default = ""; };
              unitConfig = mkOption { type = unitSection; default = { }; };
              serviceConfig = mkOption { type = unitSection; default = { }; };
            };
          }
        );
      };
      networking.firewall.allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
      services.postgresql = {
        enable = mkOption { type = types.bool; default = false; };
        package = mkOption { type = types.package; default = fakePackage "postgresql"; };
        ensureDatabases = mkOption { type = types.listOf types.str; default = [ ]; };
        ensureUsers = mkOption {
          default = [ ];
          type = types.listOf (
            types.submodule {
              options = {
                name = mkOption { type = types.str; };
                ensureDBOwnership = mkOption { type = types.bool; default = false; };
                ensureClauses = mkOption { type = types.attrsOf types.bool; default = { }; };
              };
            }
          );
        };
        authentication = mkOption { type = types.lines; default = ""; };
      };
      services.apache-kafka = {
        enable = mkOption { type = types.bool; default = false; };
        clusterId = mkOption { type = types.nullOr types.str; default = null; };
        formatLogDirs = mkOption { type = types.bool; default = false; };
        settings = mkOption {
          type = types.attrsOf (
            types.nullOr (types.oneOf [ types.bool types.int types.str (types.listOf types.str) ])
          );
          default = { };
        };
      };
      services.minio = {
        enable = mkOption { type = types.bool; default = false; };
        listenAddress = mkOption { type = types.str; default = ":9000"; };
        consoleAddress = mkOption { type = types.str; default = ":9001"; };
        environmentFile = mkOption { type = types.nullOr types.path; default = null; };
      };
      # services/web-servers/garage.nix
      services.garage = {
        enable = mkOption { type = types.bool; default = false; };
        package = mkOption { type = types.package; };
        extraEnvironment = mkOption { type = types.attrsOf types.str; default = { }; };
        environmentFile = mkOption { type = types.nullOr types.path; default = null; };
        logLevel = mkOption {
          type = types.enum [ "error" "warn" "info" "debug" "trace" ];
          default = "info";
        };
        settings = mkOption {
          type = types.submodule {
            freeformType = types.attrsOf tomlValue;
            options = {
              metadata_dir = mkOption { type = types.path; default = "/var/lib/garage/meta"; };
              data_dir = mkOption {
                type = types.either types.path (types.listOf types.attrs);
                default = "/var/lib/garage/data";
              };
            };
          };
          default = { };
        };
      };
    };
  };

  # The unit nixpkgs' services/web-servers/garage.nix makes (its serviceConfig, environment and
  # ordering), so that the module's hardening of it is scored on what a host runs.
  nixpkgsGarage =
    { config, ... }:
    let
      cfg = config.services.garage;
    in
    {
      config.systemd.services.garage = lib.mkIf cfg.enable {
        description = "Garage Object Storage (S3 compatible)";
        after = [ "network.target" "network-online.target" ];
        wants = [ "network.target" "network-online.target" ];
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          ExecStart = "${cfg.package}/bin/garage server";
          StateDirectory = "garage";
          DynamicUser = lib.mkDefault true;
          ProtectHome = true;
          NoNewPrivileges = true;
          EnvironmentFile = lib.optional (cfg.environmentFile != null) cfg.environmentFile;
        };
        environment = {
          RUST_LOG = lib.mkDefault "garage=${cfg.logLevel}";
        }
        // cfg.extraEnvironment;
      };
    };

  module = import ../module.nix { inherit self; };

  evaluate =
    config:
    (lib.evalModules {
      modules = [
        nixosOptions
        nixpkgsGarage
        # services/web-servers/minio.nix renamed this option; a module still setting it warns.
        (lib.mkRenamedOptionModule [ "services" "minio" "rootCredentialsFile" ] [ "services" "minio" "environmentFile" ])
        module
        { config.services.weather-pipeline = config; }
      ];
      specialArgs.pkgs = {
        stdenv.hostPlatform.system = "x86_64-linux";
        garage_2 = fakePackage "garage";
        minio-client = fakePackage "mc";
        gawk = fakePackage "gawk";
      };
    }).config;

  allDaemons = lib.genAttrs [ "logging-server" "weather-client" "window-aggregator" "iceberg-sink" "dashboard" "query-server" ] (
    _: { enable = true; }
  );

  scenarios = {
    # Each daemon alone, with its defaults.
    logging-server.logging-server.enable = true;
    weather-client.weather-client.enable = true;
    window-aggregator.window-aggregator.enable = true;
    iceberg-sink.iceberg-sink.enable = true;
    dashboard.dashboard.enable = true;
    query-server.query-server.enable = true;
    # Everything on one host with the backbone.
    backbone = allDaemons // {
      backbone.enable = true;
    };
    # The backbone with MinIO, the explicit opt-in.
    minio = allDaemons // {
      backbone = {
        enable = true;
        minio = true;
      };
    };
    # Several instances of the consumers on one host, one of them exposed.
    instances = lib.recursiveUpdate allDaemons {
      backbone.enable = true;
      window-aggregator.instances = 3;
      iceberg-sink = {
        instances = 2;
        listen = "0.0.0.0:9101";
        openFirewall = true;
      };
    };
    # What the VM test (pipeline.nix) boots.
    vm-test = import ./vm-services.nix;
    # The VM test as it was before each consumer had its own block of ports: the module refuses it.
    clash = lib.recursiveUpdate (import ./vm-services.nix) { window-aggregator.listen = "127.0.0.1:9102"; };
    # Credentials, extra arguments and environment, exposed listeners.
    configured = lib.recursiveUpdate allDaemons {
      s3Endpoint = "http://127.0.0.1:3900";
      s3CredentialsFile = "/run/secrets/weather-s3";
      iceberg-sink.extraArgs = [ "--commit-interval" "30s" ];
      window-aggregator.environment.MAX_CLOCK_SKEW = "30s";
      logging-server = {
        listen = "0.0.0.0:9998";
        openFirewall = true;
        extraArgs = [ "--max-batch-readings" "5000" ];
      };
      dashboard = {
        listen = "[::]:3000";
        openFirewall = true;
      };
    };
  };
in
lib.mapAttrs (
  _: scenario:
  let
    config = evaluate scenario;
  in
  {
    inherit (config.systemd) services;
    inherit (config) warnings;
    failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
    firewall = config.networking.firewall.allowedTCPPorts;
    postgresql = {
      inherit (config.services.postgresql) enable ensureDatabases authentication;
      ensureUsers = map (u: { inherit (u) name ensureDBOwnership; }) config.services.postgresql.ensureUsers;
    };
    kafka = { inherit (config.services.apache-kafka) enable clusterId; };
    garage = { inherit (config.services.garage) enable environmentFile extraEnvironment settings; };
    minio = { inherit (config.services.minio) enable listenAddress environmentFile; };
  }
) scenarios
