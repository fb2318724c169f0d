{
  description = "weather-pipeline: a real-time lakehouse pipeline in Rust (Kafka, Iceberg, PostgreSQL)";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixpkgs-unstable";
    crane.url = "github:ipetkov/crane";
  };

  outputs =
    { self, nixpkgs, crane }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      build = pkgs: import ./nix/packages.nix { inherit pkgs crane; src = ./.; };
    in
    {
      packages = forAllSystems (
        pkgs:
        let
          built = build pkgs;
        in
        built.daemons // built.images // { default = built.all; }
      );

      apps = forAllSystems (
        pkgs:
        let
          pipeline = {
            type = "app";
            program = "${(build pkgs).pipelineApp}/bin/pipeline";
            meta.description = "Run the whole weather pipeline: PostgreSQL, a Kafka broker, the Iceberg warehouse and the five daemons";
          };
        in
        {
          inherit pipeline;
          default = pipeline;
        }
      );

      checks = nixpkgs.lib.genAttrs systems (
        system:
        let
          pkgs = nixpkgs.legacyPackages.${system};
        in
        # Every system here is Linux; the VM test needs one.
        (build pkgs).checks
        // {
          vm-pipeline = pkgs.testers.runNixOSTest (import ./nix/tests/pipeline.nix { inherit self; });
        }
      );

      devShells = forAllSystems (pkgs: {
        default = (crane.mkLib pkgs).devShell {
          checks = (build pkgs).checks;
          packages = with pkgs; [
            cargo-nextest
            postgresql
            apacheKafka
            chromium
            chromedriver
            (python3.withPackages (ps: [ ps.pyiceberg ps.moto ]))
          ];
        };
      });

      nixosModules.default = import ./nix/module.nix { inherit self; };
    };
}
