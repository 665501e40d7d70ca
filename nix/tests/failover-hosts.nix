# Engine failover across two hosts: the node `site` runs the leaf,
# Mosquitto and the instance `engine` (ingest and engine); the node
# `backup` runs its standby `engine-standby` (standbyOf, the engine
# alone), reaching the leaf over the network. The two share the service
# `engine`, and so its leader lease in the leaf's KV. SIGKILL the active
# unit and keep it down (its host is gone, as far as the site knows):
# the standby on the other host takes over within the lease's TTL plus a
# second (no dead-process shortcut across hosts: the lease runs out on
# the server), and records the takeover. Started again, the first
# instance stands by for the engine and, as the holder runs no ingest,
# reads the broker itself; a reading crosses both hosts.
{ pkgs, ... }:

let
  ttl = "3s";
  zones = {
    hall.evidence = [
      {
        sensor = "hall_pir";
        p_true = 0.99;
        p_false = 0.01;
      }
    ];
    office.evidence = [
      {
        sensor = "office_pir";
        p_true = 0.99;
        p_false = 0.01;
      }
    ];
  };
in
{
  name = "presenced-failover-hosts";

  nodes.site = {
    imports = [ ./mosquitto.nix ];

    services.presenced = {
      site = "failover";
      leaf = {
        enable = true;
        # The standby's host connects over the test network.
        host = "0.0.0.0";
        openFirewallOn = [ "eth1" ];
      };
      instances.engine.settings = {
        lease.ttl = ttl;
        mqtt.z2m.zigbee2mqtt.devices = [
          {
            device = "hall_pir";
            kind = "occupancy";
          }
          {
            device = "office_pir";
            kind = "occupancy";
          }
        ];
        inherit zones;
      };
    };

    systemd.services.presenced-engine = {
      wants = [ "mosquitto.service" ];
      after = [ "mosquitto.service" ];
    };
  };

  nodes.backup = {
    services.presenced = {
      site = "failover";
      # On another host the primary's settings are given by hand: the
      # same site, zones and lease, and the leaf's address.
      instances.engine-standby = {
        standbyOf = "engine";
        settings = {
          nats.url = "nats://site:4222";
          lease.ttl = ttl;
          inherit zones;
        };
      };
    };
  };

  testScript = ''
    import json
    import time

    def role(node):
        out = node.succeed("curl -sf http://127.0.0.1:9464/healthz")
        return json.loads(out)["engine"]["role"]

    def motion(device):
        site.succeed(
            f"mosquitto_pub -h 127.0.0.1 -q 1 -t zigbee2mqtt/{device} -m '{{\"occupancy\":true}}'"
        )

    def occupied(zone):
        site.wait_until_succeeds(
            f"nats kv get presence {zone} --raw | jq -e '.state == \"occupied\"'", timeout=60
        )

    start_all()
    site.wait_for_unit("nats.service")
    site.wait_for_unit("mosquitto.service")
    site.wait_for_unit("presenced-provision.service")
    site.wait_for_unit("presenced-engine.service")
    site.wait_until_succeeds(
        "curl -sf http://127.0.0.1:9464/healthz | jq -e '.engine.role == \"active\"'", timeout=30
    )

    with subtest("the instance on the second host stands by"):
        backup.wait_for_unit("presenced-engine-standby.service")
        backup.wait_until_succeeds(
            "curl -sf http://127.0.0.1:9464/healthz | jq -e '.engine.role == \"standby\"'", timeout=60
        )
        motion("hall_pir")
        occupied("hall")

    with subtest("SIGKILL of the active unit: the other host takes over within TTL + 1 s"):
        # Killed and kept down (no Restart=): its host is gone.
        site.succeed(
            "systemctl kill -s SIGKILL presenced-engine.service && systemctl stop presenced-engine.service"
        )
        killed = time.monotonic()
        while role(backup) != "active":
            assert time.monotonic() - killed < 15, "the standby did not take over"
            time.sleep(0.05)
        took = time.monotonic() - killed
        print(f"takeover across hosts {took:.2f} s after the SIGKILL")
        assert took <= 4.0, f"takeover took {took:.2f} s, more than TTL + 1 s"

    with subtest("the takeover is on record, from the first host to the second"):
        site.succeed(
            "nats stream get EVENTS --last-for events.failover.takeover.engine --json"
            " | jq -r .data | base64 -d"
            " | jq -e '.kind == \"engine_takeover\" and (.from | startswith(\"site/\")) and (.to | startswith(\"backup/\"))'"
        )

    with subtest("the first instance comes back as the standby and reads; the second decides"):
        site.succeed("systemctl start presenced-engine.service")
        site.wait_until_succeeds(
            "curl -sf http://127.0.0.1:9464/healthz | jq -e '.engine.role == \"standby\"'", timeout=30
        )
        site.wait_until_succeeds(
            "journalctl -u presenced-engine.service | grep -q 'the lease holder does not run ingest'", timeout=30
        )
        motion("office_pir")
        occupied("office")
        assert role(backup) == "active"
  '';
}
