# An S3 server (MinIO, standing in for Wasabi) and two edges: a snapshot of
# the first edge's state is uploaded and verified; restoring it from S3 on
# a fresh edge reproduces the state.
{ pkgs, ... }:

let
  site = "edge";
  # Test credentials only; real ones never go in the store.
  minioCredentials = pkgs.writeText "minio-credentials" ''
    MINIO_ROOT_USER=presenced-test
    MINIO_ROOT_PASSWORD=presenced-test-secret
  '';

  edge =
    { config, ... }:
    {
      imports = [ ./mosquitto.nix ];
      # Stand-ins for the operator's secret files (outside the store path
      # check: /etc entries are symlinks, their own path is not in it).
      environment.etc."presenced/s3-access-key-id".text = "presenced-test";
      environment.etc."presenced/s3-secret-access-key".text = "presenced-test-secret";
      environment.etc."presenced/archiver.toml".source =
        config.services.presenced.instances.archiver.configFile;

      services.presenced = {
        inherit site;
        leaf.enable = true;
        instances.main.settings = {
          mqtt.z2m.zigbee2mqtt.devices = [
            {
              device = "hall_pir";
              kind = "occupancy";
            }
          ];
          zones.hall.evidence = [
            {
              sensor = "hall_pir";
              p_true = 0.99;
              p_false = 0.01;
            }
          ];
        };
        instances.archiver = {
          s3 = {
            accessKeyIdFile = "/etc/presenced/s3-access-key-id";
            secretAccessKeyFile = "/etc/presenced/s3-secret-access-key";
          };
          # The key files are set by `s3` above, as credentials.
          settings.archive = {
            every = "1h";
            s3 = {
              endpoint = "http://s3:9000";
              region = "us-east-1";
              bucket = "presenced";
              path_style = true;
            };
          };
        };
      };
    };
in
{
  name = "presenced-archive";

  nodes = {
    s3 = {
      services.minio = {
        enable = true;
        rootCredentialsFile = minioCredentials;
      };
      networking.firewall.allowedTCPPorts = [ 9000 ];
      environment.systemPackages = [ pkgs.minio-client ];
    };
    edge1 = edge;
    edge2 = edge;
  };

  testScript = ''
    start_all()
    s3.wait_for_unit("minio.service")
    s3.wait_for_open_port(9000)
    s3.wait_until_succeeds(
        "mc alias set local http://127.0.0.1:9000 presenced-test presenced-test-secret"
    )
    s3.succeed("mc mb local/presenced")

    edge1.wait_for_unit("presenced-main.service")
    edge1.wait_for_unit("presenced-archiver.service")
    edge1.succeed(
        "mosquitto_pub -h 127.0.0.1 -q 1 -t zigbee2mqtt/hall_pir -m '{\"occupancy\":true}'"
    )
    edge1.wait_until_succeeds(
        "nats kv get presence hall --raw | jq -e '.state == \"occupied\"'", timeout=60
    )

    archiver = "--config /etc/presenced/archiver.toml"

    with subtest("a snapshot is uploaded and verified"):
        edge1.succeed(f"presenced snapshot {archiver}")
        s3.wait_until_succeeds(
            "mc ls --recursive local/presenced/${site}/ | grep -q presence", timeout=120
        )
        # The outbox records the upload; --verify reads both copies back.
        edge1.wait_until_succeeds(
            f"presenced snapshots {archiver} --json | jq -se 'map(select(.state == \"uploaded\")) | length > 0'",
            timeout=120,
        )
        edge1.succeed(f"presenced snapshots {archiver} --verify")

    with subtest("restore from S3 on a fresh edge reproduces the state"):
        snapshot = edge1.succeed(
            f"presenced snapshots {archiver} --json | jq -rs 'map(select(.state == \"uploaded\")) | last | .id'"
        ).strip()
        edge2.wait_for_unit("presenced-provision.service")
        edge2.succeed("systemctl stop presenced-main.service presenced-archiver.service")
        edge2.succeed(f"presenced restore {archiver} --from-s3 --force {snapshot}")
        want = edge1.succeed("nats kv get presence hall --raw | jq -c '{state, transitions}'")
        got = edge2.succeed("nats kv get presence hall --raw | jq -c '{state, transitions}'")
        assert want == got, f"restored {got}, expected {want}"
  '';
}
