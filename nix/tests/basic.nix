# One VM: the leaf, Mosquitto and one presenced instance. A motion message
# makes a zone occupied; a SIGKILL in the middle of a debounce still yields
# exactly one transition to occupied; the unit is Type=notify with a
# watchdog the daemon keeps feeding.
{ ... }:

{
  name = "presenced-basic";

  nodes.machine = {
    imports = [ ./mosquitto.nix ];

    services.presenced = {
      site = "basic";
      leaf.enable = true;
      instances.main = {
        watchdogSec = "10s";
        settings = {
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
          # Long enough to kill the daemon while the zone is arriving.
          zones.office = {
            arrive_after = "20s";
            evidence = [
              {
                sensor = "office_pir";
                p_true = 0.99;
                p_false = 0.01;
              }
            ];
          };
        };
      };
    };

    systemd.services.presenced-main = {
      wants = [ "mosquitto.service" ];
      after = [ "mosquitto.service" ];
    };
  };

  testScript = ''
    import json

    def zone(name):
        return json.loads(machine.succeed(f"nats kv get presence {name} --raw"))

    def events():
        return int(machine.succeed("nats stream info EVENTS --json | jq .state.messages").strip())

    def motion(device):
        machine.succeed(
            f"mosquitto_pub -h 127.0.0.1 -q 1 -t zigbee2mqtt/{device} -m '{{\"occupancy\":true}}'"
        )

    start_all()
    machine.wait_for_unit("nats.service")
    machine.wait_for_unit("mosquitto.service")
    machine.wait_for_unit("presenced-provision.service")
    machine.wait_for_unit("presenced-main.service")

    with subtest("the unit reached READY and its watchdog is armed"):
        # For Type=notify, systemd reports `active` only after READY=1.
        machine.succeed("test \"$(systemctl show -P Type presenced-main)\" = notify")
        machine.succeed("test \"$(systemctl show -P ActiveState presenced-main)\" = active")
        machine.succeed("test \"$(systemctl show -P WatchdogUSec presenced-main)\" = 10s")
        machine.wait_until_succeeds("test -n \"$(systemctl show -P StatusText presenced-main)\"")
        # The daemon itself sends WATCHDOG=1: the timestamp moves.
        first = machine.wait_until_succeeds(
            "t=$(systemctl show -P WatchdogTimestampMonotonic presenced-main); test \"$t\" != 0 && echo $t"
        ).strip()
        machine.wait_until_succeeds(
            f"test \"$(systemctl show -P WatchdogTimestampMonotonic presenced-main)\" != {first}",
            timeout=30,
        )
        machine.succeed("curl -sf http://127.0.0.1:9464/healthz")

    with subtest("motion makes the zone occupied"):
        motion("hall_pir")
        machine.wait_until_succeeds(
            "nats kv get presence hall --raw | jq -e '.state == \"occupied\"'", timeout=60
        )

    with subtest("SIGKILL during a debounce: the transition happens, once"):
        before = events()
        motion("office_pir")
        machine.wait_until_succeeds(
            "nats kv get presence office --raw | jq -e '.state == \"arriving\"'", timeout=60
        )
        pid = machine.succeed("systemctl show -P MainPID presenced-main").strip()
        machine.succeed("systemctl kill -s KILL presenced-main")
        machine.wait_until_succeeds(
            f"test \"$(systemctl show -P MainPID presenced-main)\" != {pid}"
            " && systemctl is-active presenced-main",
            timeout=60,
        )
        machine.wait_until_succeeds(
            "nats kv get presence office --raw | jq -e '.state == \"occupied\"'", timeout=90
        )
        state = zone("office")
        assert state["transitions"] == 2, f"vacant -> arriving -> occupied expected, got {state}"
        assert events() - before == 2, f"two transitions expected in EVENTS, got {events() - before}"
        assert int(machine.succeed("systemctl show -P NRestarts presenced-main")) >= 1
  '';
}
