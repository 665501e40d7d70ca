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

  # Stand-ins for the operator's secret files, named as the module loads
  # them (credentials `s3-access-key-id`, `s3-secret-access-key`). /etc
  # entries are symlinks into the store, but their own path is not in it,
  # so the module's store-path check holds as on a real host. The CLI
  # commands below read the archiver's config outside systemd, so they get
  # this directory as CREDENTIALS_DIRECTORY.
  credentials = "/etc/presenced-test-credentials";

  edge = {
    imports = [ ./mosquitto.nix ];
    environment.etc."presenced-test-credentials/s3-access-key-id".text = "presenced-test";
    environment.etc."presenced-test-credentials/s3-secret-access-key".text = "presenced-test-secret";

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
          accessKeyIdFile = "${credentials}/s3-access-key-id";
          secretAccessKeyFile = "${credentials}/s3-secret-access-key";
        };
        # main serves /healthz and /metrics on the default port.
        settings.http.listen = "127.0.0.1:9465";
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

    # The module puts every instance's config at /etc/presenced/<name>.toml.
    archiver = "--config /etc/presenced/archiver.toml"

    def cli(args):
        return f"CREDENTIALS_DIRECTORY=${credentials} presenced {args}"

    with subtest("a snapshot is uploaded and verified"):
        edge1.succeed(cli(f"snapshot {archiver}"))
        s3.wait_until_succeeds(
            "mc ls --recursive local/presenced/${site}/ | grep -q presence", timeout=120
        )
        # The outbox records the upload; --verify reads both copies back.
        edge1.wait_until_succeeds(
            cli(f"snapshots {archiver} --json") + " | jq -se 'map(select(.state == \"uploaded\")) | length > 0'",
            timeout=120,
        )
        edge1.succeed(cli(f"snapshots {archiver} --verify"))

    with subtest("restore from S3 on a fresh edge reproduces the state"):
        snapshot = edge1.succeed(
            cli(f"snapshots {archiver} --json") + " | jq -rs 'map(select(.state == \"uploaded\")) | last | .id'"
        ).strip()
        edge2.wait_for_unit("presenced-provision.service")
        edge2.succeed("systemctl stop presenced-main.service presenced-archiver.service")
        edge2.succeed(cli(f"restore {archiver} --from-s3 --force {snapshot}"))
        want = edge1.succeed("nats kv get presence hall --raw | jq -c '{state, transitions}'")
        got = edge2.succeed("nats kv get presence hall --raw | jq -c '{state, transitions}'")
        assert want == got, f"restored {got}, expected {want}"
  '';
}
