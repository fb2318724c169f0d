# services.weather-pipeline of the VM test (pipeline.nix): shared with module-eval.nix, so that
# scripts/check-nix-module checks the very configuration the VM boots.
{
  backbone.enable = true;
  logging-server.enable = true;
  window-aggregator.enable = true;
  dashboard.enable = true;
  # The warehouse is bucket `warehouse` of the backbone's Garage, with the key it made. Two
  # instances share the topic's partitions (units iceberg-sink@0 and @1, on 9101 and 9102).
  iceberg-sink = {
    enable = true;
    instances = 2;
  };
  query-server.enable = true;
}
