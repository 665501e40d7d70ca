# The leaf enforces the ownership map: a service writing outside its
# keyspace is refused by the server, and the daemon reports the violation
# to AUDIT.
#
# The engine instance is left without its component in the map on
# purpose: the engine's consumer and KV `presence` are then outside its
# keyspace, so its first request there is refused; the daemon records it
# on `audit.events.<site>.engine` (kind `permission_violation`), logs it
# and exits.
#
# `presenced keygen` writes the seed to --out and prints the public key on
# stdout, which is kept beside the seed as <out>.pub. The keys are
# made at build time and their public halves read back at evaluation time
# (import from derivation), which is fine for a test and never done for a
# real site, whose seeds must not enter the store.
{ pkgs, self, ... }:

let
  site = "acl";
  presenced = self.packages.${pkgs.stdenv.hostPlatform.system}.presenced;
  keys = pkgs.runCommand "presenced-acl-test-keys" { nativeBuildInputs = [ presenced ]; } ''
    mkdir "$out"
    for service in admin ingest engine; do
      presenced keygen "$service" --out "$out/$service.nk" > "$out/$service.nk.pub"
    done
  '';
  publicKey = service: pkgs.lib.fileContents "${keys}/${service}.nk.pub";
in
{
  name = "presenced-acl";

  nodes.machine = {
    imports = [ ./mosquitto.nix ];

    # Test keys only: copied out of the store so the seed-path check holds
    # as it would on a real host.
    systemd.tmpfiles.rules =
      map (service: "C /run/keys/${service}.nk 0400 root root - ${keys}/${service}.nk")
        [
          "admin"
          "ingest"
          "engine"
        ];

    services.presenced = {
      inherit site;
      leaf = {
        enable = true;
        authorization = {
          enable = true;
          access = {
            admin.nkey = publicKey "admin";
            services = {
              ingest = {
                nkey = publicKey "ingest";
                runs = [ "ingest" ];
              };
              # Wrong on purpose: the engine instance runs no component in
              # the map, so it may read SENSORS but write no keyspace.
              engine = {
                nkey = publicKey "engine";
                runs = [ ];
                reads = [ "sensors" ];
              };
            };
          };
        };
      };
      provision.nkeySeedFile = "/run/keys/admin.nk";
      instances.ingest = {
        nkeySeedFile = "/run/keys/ingest.nk";
        settings.runs = [ "ingest" ];
        settings.mqtt.z2m.zigbee2mqtt.devices = [
          {
            device = "hall_pir";
            kind = "occupancy";
          }
        ];
      };
      instances.engine = {
        nkeySeedFile = "/run/keys/engine.nk";
        # ingest serves /healthz and /metrics on the default port.
        settings.http.listen = "127.0.0.1:9465";
        settings.zones.hall.evidence = [
          {
            sensor = "hall_pir";
            p_true = 0.99;
            p_false = 0.01;
          }
        ];
      };
    };
  };

  testScript = ''
    admin = "--nkey /run/keys/admin.nk"

    start_all()
    machine.wait_for_unit("nats.service")
    machine.wait_for_unit("presenced-provision.service")
    machine.wait_for_unit("presenced-ingest.service")

    with subtest("LoadCredential hands the daemon its seed, which is not in its unit's closure"):
        # (The engine exits at its first refusal, taking its credentials.)
        machine.succeed("test -s /run/credentials/presenced-ingest.service/nkey-seed")
        machine.fail(
            "grep -rlF \"$(cat /run/keys/ingest.nk)\" $(nix-store -qR"
            " $(dirname $(readlink -f /etc/systemd/system/presenced-ingest.service)))"
        )

    with subtest("a client without a key is refused"):
        machine.fail("nats stream ls")

    with subtest("a write outside the keyspace is refused and audited"):
        machine.succeed(
            "mosquitto_pub -h 127.0.0.1 -q 1 -t zigbee2mqtt/hall_pir -m '{\"occupancy\":true}'"
        )
        machine.wait_until_succeeds(
            f"nats {admin} stream info AUDIT --json | jq -e '.state.messages > 0'", timeout=90
        )
        machine.succeed(
            f"nats {admin} stream get AUDIT --last-for 'audit.events.${site}.>' --json"
            " | jq -r .data | base64 -d | grep -i 'permission'"
        )
        machine.fail(f"nats {admin} kv get presence hall")
        machine.succeed("journalctl -u presenced-engine | grep -i 'permission'")

    with subtest("the ingest still writes its own keyspace"):
        machine.wait_until_succeeds(
            f"nats {admin} stream info SENSORS --json | jq -e '.state.messages > 0'"
        )
  '';
}
