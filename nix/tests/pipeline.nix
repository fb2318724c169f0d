# NixOS VM test: the module with its backbone; readings sent to the logging-server must arrive
# as window rows in PostgreSQL and as rows of the Iceberg table.
{ self }:
{
  name = "weather-pipeline";

  nodes.machine =
    { pkgs, ... }:
    {
      imports = [ self.nixosModules.default ];
      virtualisation.memorySize = 4096;
      services.weather-pipeline = {
        backbone.enable = true;
        logging-server.enable = true;
        window-aggregator.enable = true;
        dashboard.enable = true;
        iceberg-sink = {
          enable = true;
          # No S3 server in the VM: a filesystem warehouse the sink's unit may write.
          environment.WAREHOUSE = "file:///var/lib/weather-warehouse";
        };
      };
      systemd.services.weather-pipeline-iceberg-sink.serviceConfig.StateDirectory = "weather-warehouse";
      environment.systemPackages = [ pkgs.curl pkgs.postgresql ];
    };

  testScript = ''
    machine.wait_for_unit("weather-pipeline-logging-server.service")
    machine.wait_for_unit("weather-pipeline-window-aggregator.service")
    machine.wait_for_unit("weather-pipeline-iceberg-sink.service")
    machine.wait_for_unit("weather-pipeline-dashboard.service")

    for i in range(50):
        machine.succeed(f"curl -fsS 'http://127.0.0.1:9998/log?city=Boston&temperature={i}'")

    machine.wait_until_succeeds(
        "test $(sudo -u postgres psql -tA weather -c 'SELECT coalesce(sum(record_count), 0) FROM weather') -eq 50",
        timeout=120,
    )
    machine.wait_until_succeeds(
        "curl -fsS http://127.0.0.1:9101/metrics | grep -E '^iceberg_sink_records_written_total 50$'",
        timeout=120,
    )
    machine.succeed("curl -fsS http://127.0.0.1:3000/api/weather | grep Boston")
    machine.succeed("journalctl -u weather-pipeline-logging-server.service | grep 'broker reachable'")
  '';
}
