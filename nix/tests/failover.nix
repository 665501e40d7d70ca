# Engine failover on one VM: the leaf, Mosquitto, an instance `engine`
# (ingest and engine) and its standby `engine-standby` (standbyOf, the
# engine alone), two units sharing the service's identity and leader
# lease. SIGKILL the active unit: the standby takes over within the
# lease's TTL plus a second, the takeover is on record in EVENTS, the
# killed unit comes back (Restart=) as the standby, and readings keep
# reaching KV presence. (Two units of one host, not two hosts: the
# takeover across hosts is the same compare-and-set on the leaf's lease.)
{ pkgs, ... }:

{
  name = "presenced-failover";

  nodes.machine = {
    imports = [ ./mosquitto.nix ];

    services.presenced = {
      site = "failover";
      leaf.enable = true;
      instances.engine.settings = {
        lease.ttl = "3s";
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
        zones.hall.evidence = [
          {
            sensor = "hall_pir";
            p_true = 0.99;
            p_false = 0.01;
          }
        ];
        zones.office.evidence = [
          {
            sensor = "office_pir";
            p_true = 0.99;
            p_false = 0.01;
          }
        ];
      };
      instances.engine-standby = {
        standbyOf = "engine";
        page.listen = "127.0.0.1:9465";
      };
    };

    systemd.services.presenced-engine = {
      wants = [ "mosquitto.service" ];
      after = [ "mosquitto.service" ];
    };
  };

  testScript = ''
    import json
    import time

    def role(port):
        out = machine.succeed(f"curl -sf http://127.0.0.1:{port}/healthz")
        return json.loads(out)["engine"]["role"]

    def motion(device):
        machine.succeed(
            f"mosquitto_pub -h 127.0.0.1 -q 1 -t zigbee2mqtt/{device} -m '{{\"occupancy\":true}}'"
        )

    def occupied(zone):
        machine.wait_until_succeeds(
            f"nats kv get presence {zone} --raw | jq -e '.state == \"occupied\"'", timeout=60
        )

    start_all()
    machine.wait_for_unit("nats.service")
    machine.wait_for_unit("mosquitto.service")
    machine.wait_for_unit("presenced-provision.service")
    machine.wait_for_unit("presenced-engine.service")
    machine.wait_for_unit("presenced-engine-standby.service")

    with subtest("one instance is active, the other stands by"):
        machine.wait_until_succeeds(
            "curl -sf http://127.0.0.1:9464/healthz | jq -e '.engine.role == \"active\"'", timeout=30
        )
        machine.wait_until_succeeds(
            "curl -sf http://127.0.0.1:9465/healthz | jq -e '.engine.role == \"standby\"'", timeout=30
        )
        motion("hall_pir")
        occupied("hall")

    with subtest("SIGKILL of the active unit: the standby takes over within TTL + 1 s"):
        machine.succeed("systemctl kill -s SIGKILL presenced-engine.service")
        killed = time.monotonic()
        while role(9465) != "active":
            assert time.monotonic() - killed < 10, "the standby did not take over"
            time.sleep(0.05)
        took = time.monotonic() - killed
        print(f"takeover {took:.2f} s after the SIGKILL")
        assert took <= 4.0, f"takeover took {took:.2f} s, more than TTL + 1 s"

    with subtest("the takeover is on record in EVENTS, and is no transition"):
        machine.succeed(
            "nats stream get EVENTS --last-for events.failover.takeover.engine --json"
            " | jq -r .data | base64 -d | jq -e '.kind == \"engine_takeover\" and .from != null'"
        )

    with subtest("the killed unit comes back as the standby; readings flow"):
        machine.wait_for_unit("presenced-engine.service")
        machine.wait_until_succeeds(
            "curl -sf http://127.0.0.1:9464/healthz | jq -e '.engine.role == \"standby\"'", timeout=30
        )
        motion("office_pir")
        occupied("office")
        assert role(9465) == "active"
  '';
}
