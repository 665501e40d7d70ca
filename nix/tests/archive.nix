# An S3 server (SeaweedFS, standing in for Wasabi, as in the sandbox and the
# crate's tests) and two edges: a snapshot of the first edge's state is
# uploaded and verified; restoring it from S3 on a fresh edge reproduces
# the state. (MinIO is no longer maintained upstream and marked insecure in
# nixpkgs.)
{ lib, pkgs, ... }:

let
  site = "edge";
  # Test credentials only; real ones never go in the store. SeaweedFS's
  # one identity; anonymous requests are refused.
  s3Identities = pkgs.writeText "s3-identities.json" (
    builtins.toJSON {
      identities = [
        {
          name = "presenced";
          credentials = [
            {
              accessKey = "presenced-test";
              secretKey = "presenced-test-secret";
            }
          ];
          actions = [
            "Admin"
            "Read"
            "Write"
            "List"
            "Tagging"
          ];
        }
      ];
    }
  );
  # S3 requests signed with the test key (curl's SigV4).
  s3curl = "curl -sSf --aws-sigv4 aws:amz:us-east-1:s3 --user presenced-test:presenced-test-secret";

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
      virtualisation.memorySize = 1024;
      systemd.services.seaweedfs = {
        description = "SeaweedFS S3 server (Wasabi's stand-in)";
        wantedBy = [ "multi-user.target" ];
        after = [ "network.target" ];
        serviceConfig = {
          # Master, volume, filer and S3 gateway in one process; only the
          # S3 port is reached from outside.
          ExecStart = lib.concatStringsSep " " [
            "${pkgs.seaweedfs}/bin/weed server"
            "-dir=/var/lib/seaweedfs"
            "-ip=127.0.0.1"
            "-ip.bind=0.0.0.0"
            "-master.volumeSizeLimitMB=64"
            "-volume.max=30"
            "-filer"
            "-s3"
            "-s3.port=9000"
            "-s3.config=${s3Identities}"
          ];
          DynamicUser = true;
          StateDirectory = "seaweedfs";
        };
      };
      networking.firewall.allowedTCPPorts = [ 9000 ];
    };
    edge1 = edge;
    edge2 = edge;
  };

  testScript = ''
    start_all()
    s3.wait_for_unit("seaweedfs.service")
    s3.wait_for_open_port(9000)
    # The bucket must exist, as on Wasabi; the gateway may answer before
    # its filer does, so retry.
    s3.wait_until_succeeds("${s3curl} -X PUT http://127.0.0.1:9000/presenced", timeout=120)

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
            "${s3curl} 'http://127.0.0.1:9000/presenced?list-type=2&prefix=${site}%2F' | grep -q presence",
            timeout=120,
        )
        # The outbox records the upload; --verify reads both copies back.
        edge1.wait_until_succeeds(
            cli(f"snapshots {archiver} --json") + " | jq -se 'map(select(.state == \"uploaded\")) | length > 0'",
            timeout=120,
        )
        # This leaf runs without NKEYs, so its snapshots are unsigned:
        # --allow-unsigned accepts that, loudly (docs/ARCHIVE.md).
        edge1.succeed(cli(f"snapshots {archiver} --verify --allow-unsigned"))

    with subtest("restore from S3 on a fresh edge reproduces the state"):
        snapshot = edge1.succeed(
            cli(f"snapshots {archiver} --json") + " | jq -rs 'map(select(.state == \"uploaded\")) | last | .id'"
        ).strip()
        edge2.wait_for_unit("presenced-provision.service")
        edge2.succeed("systemctl stop presenced-main.service presenced-archiver.service")
        edge2.succeed(cli(f"restore {archiver} --from-s3 --force --allow-unsigned {snapshot}"))
        want = edge1.succeed("nats kv get presence hall --raw | jq -c '{state, transitions}'")
        got = edge2.succeed("nats kv get presence hall --raw | jq -c '{state, transitions}'")
        assert want == got, f"restored {got}, expected {want}"
  '';
}
