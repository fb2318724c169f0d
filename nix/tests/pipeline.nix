# NixOS VM test: the module with its backbone (PostgreSQL, Kafka, Garage); readings sent to the
# logging-server must arrive as window rows in PostgreSQL and as rows of the Iceberg table, which
# the query-server counts over Trino's protocol.
{ self }:
{
  name = "weather-pipeline";

  nodes.machine =
    { pkgs, ... }:
    {
      imports = [ self.nixosModules.default ];
      virtualisation.memorySize = 4096;
      services.weather-pipeline = import ./vm-services.nix;
      environment.systemPackages = [ pkgs.curl pkgs.postgresql ];
    };

  testScript = ''
    import json
    import time

    def sql(statement):
        """Rows of `statement`, through Trino's protocol: POST, then each nextUri."""
        page = json.loads(machine.succeed(
            f"curl -fsS -H 'X-Trino-User: test' --data-binary '{statement}' http://127.0.0.1:8080/v1/statement"
        ))
        rows = []
        while "nextUri" in page:
            page = json.loads(machine.succeed(f"curl -fsS '{page['nextUri']}'"))
            rows += page.get("data", [])
        assert "error" not in page, page
        return rows

    machine.wait_for_unit("weather-pipeline-s3-bucket.service")
    machine.succeed("test $(stat -c %a /var/lib/weather-pipeline-s3/credentials) = 600")
    machine.wait_for_unit("weather-pipeline-logging-server.service")
    machine.wait_for_unit("weather-pipeline-window-aggregator.service")
    machine.wait_for_unit("weather-pipeline-iceberg-sink@0.service")
    machine.wait_for_unit("weather-pipeline-iceberg-sink@1.service")
    machine.wait_for_unit("weather-pipeline-dashboard.service")

    for i in range(50):
        machine.succeed(f"curl -fsS 'http://127.0.0.1:9998/log?city=Boston&temperature={i}'")

    machine.wait_until_succeeds(
        "test $(sudo -u postgres psql -tA weather -c 'SELECT coalesce(sum(record_count), 0) FROM weather') -eq 50",
        timeout=120,
    )
    # Whichever instance owns Boston's partition wrote them; together, exactly 50.
    machine.wait_until_succeeds(
        "curl -fsS http://127.0.0.1:9101/metrics http://127.0.0.1:9102/metrics"
        " | awk '/^iceberg_sink_records_written_total/ { n += $2 } END { exit n != 50 }'",
        timeout=120,
    )
    machine.succeed("curl -fsS http://127.0.0.1:3000/api/weather | grep Boston")
    machine.wait_for_unit("weather-pipeline-query-server.service")
    deadline = time.time() + 60
    while sql("SELECT count(*) FROM iceberg.default.weather") != [[50]]:
        assert time.time() < deadline, "the query-server does not see the 50 readings"
        time.sleep(1)
    machine.succeed("journalctl -u weather-pipeline-logging-server.service | grep 'broker reachable'")
  '';
}
