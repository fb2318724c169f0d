# NixOS module: services.weather-pipeline.<daemon> for each daemon, as hardened systemd units of
# Type=notify, and optionally the backbone (PostgreSQL, Apache Kafka in KRaft mode, an S3 server).
{ self }:
{ config, lib, pkgs, ... }:
let
  cfg = config.services.weather-pipeline;
  inherit (lib) mkOption mkEnableOption mkIf types;
  packages = self.packages.${pkgs.stdenv.hostPlatform.system};

  # Options every daemon has.
  daemonOptions = name: defaultListen: {
    enable = mkEnableOption "the weather-pipeline ${name}";
    package = mkOption {
      type = types.package;
      default = packages.${name};
      defaultText = lib.literalExpression "weather-pipeline.packages.\${system}.${name}";
      description = "Package providing bin/${name}.";
    };
    listen = mkOption {
      type = types.nullOr types.str;
      default = defaultListen;
      description = "Address of the daemon's HTTP endpoints (--listen); loopback unless you open it.";
    };
    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the port of `listen` in the firewall (give `listen` a non-loopback address too).";
    };
    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Further command-line flags (see `${name} --help`).";
    };
    environment = mkOption {
      type = types.attrsOf types.str;
      default = { };
      description = "Further environment variables; every flag has one.";
    };
  };

  # The consumers can run several instances per host: one consumer group shares the topic's
  # partitions among them.
  consumerOptions =
    name: defaultListen:
    daemonOptions name defaultListen
    // {
      instances = mkOption {
        type = types.ints.between 1 64;
        default = 1;
        description = ''
          Instances of ${name} on this host, in one consumer group: they share the topic's partitions
          (more instances than partitions leaves some idle). With more than one, the units are instances
          of the template `weather-pipeline-${name}@.service` (`@0`, `@1`, …), instance i listening on the
          port of `listen` plus i.
        '';
      };
    };

  # The systemd services a daemon runs as: one, or an instance of its template per instance.
  unitNames =
    name:
    let
      n = cfg.${name}.instances or 1;
    in
    if n == 1 then
      [ "weather-pipeline-${name}.service" ]
    else
      map (i: "weather-pipeline-${name}@${toString i}.service") (lib.range 0 (n - 1));

  # `listen` with its port raised by `offset`.
  shiftListen =
    listen: offset:
    let
      parts = lib.splitString ":" listen;
    in
    lib.concatStringsSep ":" (lib.init parts ++ [ (toString (lib.toInt (lib.last parts) + offset)) ]);

  # The ports a daemon's instances listen on.
  listenPorts =
    name:
    let
      d = cfg.${name};
    in
    lib.optionals (d.listen != null) (
      map (i: lib.toInt (lib.last (lib.splitString ":" (shiftListen d.listen i)))) (lib.range 0 ((d.instances or 1) - 1))
    );

  # A consumer's service `service`, or with several instances the template made of it and a
  # drop-in per instance that enables it and gives it its own listener.
  consumerServices =
    name: service:
    let
      d = cfg.${name};
    in
    if d.instances == 1 then
      { "weather-pipeline-${name}" = service; }
    else
      {
        "weather-pipeline-${name}@" = service // {
          description = "weather-pipeline ${name}, instance %i";
          # The instances are enabled one by one below; a template is not wanted by anything.
          wantedBy = [ ];
        };
      }
      // lib.listToAttrs (
        map (
          i:
          lib.nameValuePair "weather-pipeline-${name}@${toString i}" (
            {
              overrideStrategy = "asDropin";
              wantedBy = [ "multi-user.target" ];
            }
            // lib.optionalAttrs (d.listen != null) { environment.LISTEN = shiftListen d.listen i; }
          )
        ) (lib.range 0 (d.instances - 1))
      );

  daemonNames = [ "logging-server" "window-aggregator" "iceberg-sink" "dashboard" "query-server" ];

  # Every port something of this module listens on, with who: the daemons (each instance) and
  # the backbone's servers. More than one on a port: the losers exit and restart for ever.
  listeners =
    lib.concatMap (
      name:
      let
        units = unitNames name;
      in
      lib.optionals cfg.${name}.enable (
        lib.zipListsWith (who: port: { inherit who port; }) units (listenPorts name)
      )
    ) daemonNames
    ++ lib.optionals cfg.backbone.enable [
      { who = "postgresql.service"; port = 5432; }
      { who = "apache-kafka.service"; port = 9092; }
      { who = "apache-kafka.service (controller)"; port = 9093; }
    ]
    ++ lib.optionals (s3Backbone == "garage") [
      { who = "garage.service (S3)"; port = 3900; }
      { who = "garage.service (RPC)"; port = 3901; }
    ]
    ++ lib.optionals (s3Backbone == "minio") [
      { who = "minio.service"; port = 9000; }
      { who = "minio.service (console)"; port = 9001; }
    ];
  clashes = lib.filterAttrs (_: users: lib.length users > 1) (lib.groupBy (l: toString l.port) listeners);

  # The URL of daemon `name` on this host: its listener (`default` when unset), through
  # loopback when it listens on every address.
  localUrl =
    name: default:
    let
      listen = if cfg.${name}.listen != null then cfg.${name}.listen else default;
      port = lib.last (lib.splitString ":" listen);
    in
    if lib.hasPrefix "0.0.0.0:" listen then
      "http://127.0.0.1:${port}"
    else if lib.hasPrefix "[::]:" listen then
      "http://[::1]:${port}"
    else
      "http://${listen}";

  # PostgreSQL's databases and roles exist once postgresql-setup.service (in postgresql.target)
  # and our ownership step have run, not when postgresql.service is up.
  backboneUnits =
    lib.optionals cfg.backbone.enable [
      "postgresql.target"
      "weather-pipeline-database.service"
      "apache-kafka.service"
    ]
    ++ lib.optional (s3Backbone != null) "weather-pipeline-s3-bucket.service";

  # The S3 server the backbone runs, if any; its generated secrets live in s3State (root, 0700).
  s3Backbone =
    if !cfg.backbone.enable then
      null
    else if cfg.backbone.minio then
      "minio"
    else
      "garage";
  s3State = "/var/lib/weather-pipeline-s3";

  # Waits up to ten minutes (a first boot may be slow) for `ready` to succeed, saying so every
  # ten seconds; then fails, loudly, for systemd to retry.
  waitFor = what: ready: ''
    for attempt in $(seq 60); do
      if ${ready} >/dev/null 2>&1; then break; fi
      if [ "$attempt" = 60 ]; then echo "${what} is not ready after 10 minutes; giving up (systemd retries)" >&2; exit 1; fi
      echo "waiting for ${what} ($attempt)"
      sleep 10
    done
  '';

  # Creates the secrets the S3 server and the sink use, once, readable by root only: with Garage
  # its RPC secret (a file, which Garage reads through a credential; never in an environment);
  # with MinIO its root login and a key of the sink's own.
  s3Secrets = {
    description = "weather-pipeline: secrets of the backbone's S3 server";
    requiredBy = [ "${s3Backbone}.service" ];
    before = [ "${s3Backbone}.service" ];
    serviceConfig = hardening // {
      Type = "oneshot";
      RemainAfterExit = true;
      StateDirectory = baseNameOf s3State;
      StateDirectoryMode = "0700";
      # Writes files and nothing else.
      PrivateNetwork = true;
      RestrictAddressFamilies = "AF_UNIX";
    };
    script = ''
      random() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }
      cd ${s3State}
    ''
    + (
      if s3Backbone == "minio" then
        ''
          if [ ! -s server.env ]; then
            printf 'MINIO_ROOT_USER=weather-pipeline\nMINIO_ROOT_PASSWORD=%s\n' "$(random 24)" > server.env
          fi
          if [ ! -s sink-secret ]; then random 24 > sink-secret; fi
        ''
      else
        ''
          if [ ! -s rpc_secret ]; then
            # Earlier versions kept it as GARAGE_RPC_SECRET in server.env: the node keeps its secret.
            if [ -s server.env ]; then
              sed -n 's/^GARAGE_RPC_SECRET=//p' server.env > rpc_secret.new
            fi
            [ -s rpc_secret.new ] || random 32 > rpc_secret.new
            mv rpc_secret.new rpc_secret
            rm -f server.env
          fi
        ''
    );
  };

  # Creates the bucket `warehouse` and a key that may use it, and writes the key for the sink.
  # The units that need the key require this one, so none starts without it.
  s3Bucket = {
    description = "weather-pipeline: the warehouse bucket and the sink's key";
    wantedBy = [ "multi-user.target" ];
    requires = [ "${s3Backbone}.service" ];
    after = [ "${s3Backbone}.service" ];
    before = unitNames "iceberg-sink" ++ unitNames "query-server";
    path = [ pkgs.gawk ];
    environment = lib.optionalAttrs (s3Backbone == "garage") { GARAGE_RPC_SECRET_FILE = "${s3State}/rpc_secret"; };
    unitConfig.StartLimitIntervalSec = 0;
    serviceConfig =
      hardening
      // {
        Type = "oneshot";
        RemainAfterExit = true;
        Restart = "on-failure";
        RestartSec = "30s";
        TimeoutStartSec = "15min";
        StateDirectory = baseNameOf s3State;
        StateDirectoryMode = "0700";
        # Talks to the S3 server on this host and to nothing else.
        IPAddressAllow = "localhost";
        IPAddressDeny = "any";
      }
      // lib.optionalAttrs (s3Backbone == "minio") { EnvironmentFile = "${s3State}/server.env"; }
;
    script =
      if s3Backbone == "minio" then
        let
          mc = lib.getExe' pkgs.minio-client "mc";
        in
        ''
          export MC_CONFIG_DIR=${s3State}/mc MC_HOST_local="http://$MINIO_ROOT_USER:$MINIO_ROOT_PASSWORD@127.0.0.1:9000"
          ${waitFor "MinIO" "${mc} ready local"}
          ${mc} mb --ignore-existing local/warehouse
          # The sink's own key, allowed the warehouse bucket alone (not MinIO's root login).
          cat > ${s3State}/warehouse-policy.json <<'EOF'
          {"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:*"],"Resource":["arn:aws:s3:::warehouse","arn:aws:s3:::warehouse/*"]}]}
          EOF
          ${mc} admin policy create local weather-pipeline-warehouse ${s3State}/warehouse-policy.json
          ${mc} admin user add local weather-pipeline-sink "$(cat ${s3State}/sink-secret)"
          ${mc} admin policy attach local weather-pipeline-warehouse --user weather-pipeline-sink \
            || ${mc} admin user info local weather-pipeline-sink | grep -q weather-pipeline-warehouse
          printf 'AWS_ACCESS_KEY_ID=weather-pipeline-sink\nAWS_SECRET_ACCESS_KEY=%s\n' "$(cat ${s3State}/sink-secret)" > ${s3State}/credentials.new
          mv ${s3State}/credentials.new ${s3State}/credentials
        ''
      else
        let
          garage = "${cfg.backbone.garagePackage}/bin/garage";
        in
        ''
          ${waitFor "Garage" "${garage} status"}
          node=$(${garage} node id -q | cut -d@ -f1)
          if ${garage} layout show | grep -q 'No nodes currently have a role'; then
            ${garage} layout assign -z local -c 1G "$node"
            ${garage} layout apply --version 1
          fi
          ${garage} bucket info warehouse >/dev/null 2>&1 || ${garage} bucket create warehouse
          ${garage} key info weather-pipeline-sink >/dev/null 2>&1 || ${garage} key create weather-pipeline-sink
          ${garage} bucket allow --read --write warehouse --key weather-pipeline-sink
          ${garage} key info weather-pipeline-sink --show-secret | awk '
            /Key ID:/ { id = $NF }
            /Secret key:/ { secret = $NF }
            END {
              if (id == "" || secret == "") exit 1
              printf "AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n", id, secret
            }' > ${s3State}/credentials.new
          mv ${s3State}/credentials.new ${s3State}/credentials
        '';
  };

  # The sandbox of every unit of this module, the helpers' included: what a daemon needs is the
  # network and its credentials; each unit adds what it needs beyond that.
  hardening = {
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    NoNewPrivileges = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    ProtectProc = "invisible";
    ProcSubset = "pid";
    PrivateUsers = true;
    PrivateMounts = true;
    RemoveIPC = true;
    RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [ "@system-service" "~@privileged" "~@resources" ];
    # A call outside the filter fails with EPERM (and is logged) instead of killing the daemon.
    SystemCallErrorNumber = "EPERM";
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    UMask = "0077";
  };

  # The daemons that talk to Kafka; the others are not given its address.
  kafkaDaemons = [ "logging-server" "window-aggregator" "iceberg-sink" ];
  # The daemons that use PostgreSQL run as the dynamic user `weather`, which peer
  # authentication maps to the role `weather`.
  databaseDaemons = [ "window-aggregator" "iceberg-sink" "dashboard" "query-server" ];

  # The daemons that open the Iceberg table (the sink writes it, the query-server reads it):
  # catalog, warehouse and S3, the S3 keys by LoadCredential.
  lakehouseUnit =
    name:
    lib.recursiveUpdate
      (unit name (
        {
          CATALOG_URL = cfg.catalogUrl;
          WAREHOUSE = cfg.warehouse;
        }
        // lib.optionalAttrs (cfg.s3Endpoint != null) {
          S3_ENDPOINT = cfg.s3Endpoint;
          S3_REGION = cfg.s3Region;
        }
        // lib.optionalAttrs (cfg.s3CredentialsFile != null) {
          S3_CREDENTIALS_FILE = "%d/s3";
        }
      ))
      (
        {
          serviceConfig.LoadCredential = lib.optional (cfg.s3CredentialsFile != null) "s3:${cfg.s3CredentialsFile}";
        }
        # Without the bucket's key its LoadCredential fails: it waits for the bucket unit, and
        # does not start when that failed.
        // lib.optionalAttrs (s3Backbone != null) { requires = [ "weather-pipeline-s3-bucket.service" ]; }
      );

  unit =
    name: extraEnv:
    let
      d = cfg.${name};
    in
    {
      description = "weather-pipeline ${name}";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ] ++ backboneUnits;
      after = [ "network-online.target" ] ++ backboneUnits;
      unitConfig.StartLimitIntervalSec = 0;
      environment =
        {
          RUST_LOG = "info";
        }
        // lib.optionalAttrs (lib.elem name kafkaDaemons) { KAFKA_BROKERS = cfg.kafkaBrokers; }
        // lib.optionalAttrs (d.listen != null) { LISTEN = d.listen; }
        // extraEnv
        // d.environment;
      serviceConfig = hardening // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = lib.escapeShellArgs ([ (lib.getExe d.package) ] ++ d.extraArgs);
        WatchdogSec = "30s";
        # Restarted for as long as it fails, a minute apart at most: on a slow first boot the
        # backbone may take minutes, and systemd's default start limit would give up for good.
        Restart = "on-failure";
        RestartSec = "1s";
        RestartSteps = 10;
        RestartMaxDelaySec = "1min";
        TimeoutStopSec = "90s";
        DynamicUser = true;
        User = if lib.elem name databaseDaemons then "weather" else "weather-pipeline-${name}";
        # Every socket and file the daemon holds, with room for a connection cap of a few thousand.
        LimitNOFILE = 65536;
      };
    };
in
{
  options.services.weather-pipeline = {
    kafkaBrokers = mkOption {
      type = types.str;
      default = "localhost:9092";
      description = "Kafka bootstrap servers of every daemon.";
    };
    databaseUrl = mkOption {
      type = types.str;
      default = "postgresql:///weather?host=/run/postgresql&user=weather";
      description = "PostgreSQL of the window table (window-aggregator, dashboard). No password here: use peer auth or a .pgpass.";
    };
    catalogUrl = mkOption {
      type = types.str;
      default = "postgresql:///iceberg?host=/run/postgresql&user=weather";
      description = "Iceberg SQL catalog (iceberg-sink, query-server), shared with Trino's JDBC catalog.";
    };
    warehouse = mkOption {
      type = types.str;
      default = "s3://warehouse/";
      description = "Iceberg warehouse location.";
    };
    s3Endpoint = mkOption {
      type = types.nullOr types.str;
      default =
        if s3Backbone == "garage" then
          "http://127.0.0.1:3900"
        else if s3Backbone == "minio" then
          "http://127.0.0.1:9000"
        else
          null;
      defaultText = lib.literalMD "the backbone's S3 server, else null";
      description = "S3 endpoint of an S3-compatible server; null for AWS.";
    };
    s3Region = mkOption {
      type = types.str;
      default = if s3Backbone == "garage" then "garage" else "us-east-1";
      defaultText = lib.literalMD "`garage` with the Garage backbone, else `us-east-1`";
      description = "S3 region of the warehouse.";
    };
    s3CredentialsFile = mkOption {
      type = types.nullOr types.path;
      default = if s3Backbone != null then "${s3State}/credentials" else null;
      defaultText = lib.literalMD "the key the backbone creates for the sink, else null";
      example = "/run/secrets/weather-s3";
      description = ''
        File with AWS_ACCESS_KEY_ID=… and AWS_SECRET_ACCESS_KEY=… lines, handed to iceberg-sink
        and query-server through systemd's LoadCredential: it never enters the Nix store.
      '';
    };

    logging-server = daemonOptions "logging-server" "127.0.0.1:9998";
    # Each consumer has a block of ports of its own, one per instance (up to 64).
    iceberg-sink = consumerOptions "iceberg-sink" "127.0.0.1:9101";
    window-aggregator = consumerOptions "window-aggregator" "127.0.0.1:9201";
    dashboard = daemonOptions "dashboard" "127.0.0.1:3000";
    # SQL on the table over Trino's protocol, on Trino's port.
    query-server = daemonOptions "query-server" "127.0.0.1:8080";
    weather-client = daemonOptions "weather-client" null // {
      loggingServerUrl = mkOption {
        type = types.str;
        default = localUrl "logging-server" "127.0.0.1:9998";
        defaultText = lib.literalMD "the `listen` address of `logging-server` on this host (its loopback address when it listens on all)";
        description = "The logging-server the client sends its readings to (LOGGING_SERVER_URL).";
      };
    };

    backbone = {
      enable = mkEnableOption "PostgreSQL, Apache Kafka (KRaft) and an S3 server (Garage) from nixpkgs, wired to the daemons";
      minio = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Run MinIO as the S3 server instead of Garage. nixpkgs marks MinIO insecure; enabling
          this is the explicit opt-in (and needs it permitted in nixpkgs.config).
        '';
      };
      garagePackage = mkOption {
        type = types.package;
        default = pkgs.garage_2;
        defaultText = lib.literalExpression "pkgs.garage_2";
        description = "Garage, the backbone's S3 server (unless `minio`).";
      };
    };
  };

  config = lib.mkMerge [
    {
      assertions = [
        {
          assertion = clashes == { };
          message =
            "services.weather-pipeline: several listeners on one port: "
            + lib.concatStringsSep "; " (
              lib.mapAttrsToList (port: users: "${port}: ${lib.concatMapStringsSep ", " (l: l.who) users}") clashes
            )
            + ". Give them distinct `listen` ports (instance i of a consumer listens on the port of `listen` plus i).";
        }
      ];
      networking.firewall.allowedTCPPorts = lib.concatMap (
        name: lib.optionals (cfg.${name}.enable && cfg.${name}.openFirewall) (listenPorts name)
      ) daemonNames;
    }
    (mkIf cfg.logging-server.enable {
      systemd.services.weather-pipeline-logging-server = unit "logging-server" { };
    })
    (mkIf cfg.window-aggregator.enable {
      systemd.services = consumerServices "window-aggregator" (
        unit "window-aggregator" { DATABASE_URL = cfg.databaseUrl; }
      );
    })
    (mkIf cfg.dashboard.enable {
      systemd.services.weather-pipeline-dashboard = unit "dashboard" (
        {
          DATABASE_URL = cfg.databaseUrl;
        }
        # The page links to the SQL web UI on this host.
        // lib.optionalAttrs cfg.query-server.enable { SQL_URL = "${localUrl "query-server" "127.0.0.1:8080"}/"; }
      );
    })
    (mkIf cfg.weather-client.enable {
      # mkMerge, not //: the unit keeps its own after/wants (network-online.target).
      systemd.services.weather-pipeline-weather-client = lib.mkMerge [
        (unit "weather-client" { LOGGING_SERVER_URL = cfg.weather-client.loggingServerUrl; })
        (mkIf cfg.logging-server.enable {
          after = [ "weather-pipeline-logging-server.service" ];
          wants = [ "weather-pipeline-logging-server.service" ];
        })
      ];
    })
    (mkIf cfg.iceberg-sink.enable {
      systemd.services = consumerServices "iceberg-sink" (lakehouseUnit "iceberg-sink");
    })
    (mkIf cfg.query-server.enable {
      systemd.services.weather-pipeline-query-server = lakehouseUnit "query-server";
    })
    (mkIf cfg.backbone.enable {
      services.postgresql = {
        enable = true;
        ensureDatabases = [ "weather" "iceberg" ];
        # Owner of `weather` (so of its `public` schema on PostgreSQL >= 15); `iceberg` below.
        ensureUsers = [
          {
            name = "weather";
            ensureDBOwnership = true;
          }
        ];
        # The daemons run as the dynamic user `weather`: peer authentication, no password.
        authentication = ''
          local weather,iceberg weather peer
        '';
      };
      # ensureDBOwnership covers only the database named like the role.
      systemd.services.weather-pipeline-database = {
        description = "weather-pipeline: the weather role owns the iceberg database";
        wantedBy = [ "multi-user.target" ];
        wants = [ "postgresql.target" ];
        after = [ "postgresql.target" "postgresql-setup.service" ];
        serviceConfig = hardening // {
          Type = "oneshot";
          RemainAfterExit = true;
          User = "postgres";
          # psql over PostgreSQL's socket, peer-authenticated: that works across user and
          # network namespaces, so it needs neither the network nor the host's user table.
          PrivateNetwork = true;
          RestrictAddressFamilies = "AF_UNIX";
          ExecStart = "${lib.getExe' config.services.postgresql.package "psql"} -d postgres -v ON_ERROR_STOP=1 -c 'ALTER DATABASE iceberg OWNER TO weather'";
        };
      };
      services.apache-kafka = {
        enable = true;
        # 16 bytes, base64url without padding, as `kafka-storage.sh random-uuid` prints.
        clusterId = "d2VhdGhlci1waXBlbGluZQ";
        formatLogDirs = true;
        settings = {
          "node.id" = 1;
          "process.roles" = [ "broker" "controller" ];
          "listeners" = [ "PLAINTEXT://127.0.0.1:9092" "CONTROLLER://127.0.0.1:9093" ];
          "listener.security.protocol.map" = [ "PLAINTEXT:PLAINTEXT" "CONTROLLER:PLAINTEXT" ];
          "controller.listener.names" = [ "CONTROLLER" ];
          "controller.quorum.voters" = [ "1@127.0.0.1:9093" ];
          "offsets.topic.replication.factor" = 1;
          "log.dirs" = [ "/var/lib/apache-kafka" ];
        };
      };
      systemd.services.garage = mkIf (s3Backbone == "garage") {
        # nixpkgs' unit sets DynamicUser, ProtectHome and NoNewPrivileges only. Garage needs its
        # state directory, its credential and loopback sockets; its own ProtectSystem comes with
        # the StateDirectory nixpkgs gives it.
        serviceConfig = builtins.removeAttrs hardening [ "ProcSubset" "SystemCallFilter" "UMask" ] // {
          LoadCredential = "rpc_secret:${s3State}/rpc_secret";
          SystemCallFilter = [ "@system-service" "~@privileged" ];
        };
      };
      systemd.services.weather-pipeline-s3-secrets = s3Secrets;
      systemd.services.weather-pipeline-s3-bucket = s3Bucket;
      services.minio = mkIf (s3Backbone == "minio") {
        enable = true;
        listenAddress = "127.0.0.1:9000";
        consoleAddress = "127.0.0.1:9001";
        # MINIO_ROOT_USER and MINIO_ROOT_PASSWORD: the sink has a key of its own.
        environmentFile = "${s3State}/server.env";
      };
      services.garage = mkIf (s3Backbone == "garage") {
        enable = true;
        package = cfg.backbone.garagePackage;
        # The RPC secret as a file Garage reads, handed over as a credential (whose ACL shows as
        # group bits, hence the second variable); never in the environment.
        extraEnvironment = {
          GARAGE_RPC_SECRET_FILE = "%d/rpc_secret";
          GARAGE_ALLOW_WORLD_READABLE_SECRETS = "true";
        };
        settings = {
          replication_factor = 1;
          db_engine = "sqlite";
          rpc_bind_addr = "127.0.0.1:3901";
          rpc_public_addr = "127.0.0.1:3901";
          s3_api = {
            s3_region = "garage";
            api_bind_addr = "127.0.0.1:3900";
            root_domain = ".s3.garage.localhost";
          };
        };
      };
    })
  ];
}
