# One VM: the leaf, Mosquitto and one presenced instance. A motion message
# makes a zone occupied; a SIGKILL in the middle of a debounce still yields
# exactly one transition to occupied; the unit is Type=notify with a
# watchdog the daemon keeps feeding, and a frozen daemon (SIGSTOP) is
# killed by it and restarted. As in the systemd-nspawn test
# (scripts/nspawn-test.sh): the dynamic user writes its state directory
# and nothing else, the lease names the host, and a serial port (a pty)
# that appears after the daemon started is opened and read.
{ pkgs, ... }:

{
  name = "presenced-basic";

  nodes.machine = {
    imports = [ ./mosquitto.nix ];

    environment.systemPackages = [ pkgs.socat ];

    services.presenced = {
      site = "basic";
      leaf.enable = true;
      instances.main = {
        watchdogSec = "10s";
        # The test's port is a pty, made after the daemon started.
        serialDevices = [ "/run/presenced-test/radar" ];
        serialDeviceClasses = [ "pts" ];
        settings = {
          serial.radar = {
            device = "/run/presenced-test/radar";
            framing = "json_lines";
            sensors = [ "desk_radar" ];
            # Retry the absent port every 5 s at most (30 s by default).
            reconnect_max = "5s";
          };
          zones.desk = {
            arrive_after = "1s";
            evidence = [
              {
                sensor = "desk_radar";
                p_true = 0.95;
                p_false = 0.02;
              }
            ];
          };
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

    with subtest("the dynamic user writes its state directory and nothing else"):
        pid = machine.succeed("systemctl show -P MainPID presenced-main").strip()
        uid = machine.succeed(f"stat -c %u /proc/{pid}").strip()
        gid = machine.succeed(f"stat -c %g /proc/{pid}").strip()
        as_daemon = (
            f"nsenter -t {pid} -m -- setpriv --reuid={uid} --regid={gid}"
            " --clear-groups --no-new-privs"
        )
        machine.succeed(f"{as_daemon} touch /var/lib/presenced/main/probe")
        for target in ["/etc/probe", "/var/lib/nats/probe", "/nix/store/probe", "/root/probe"]:
            machine.fail(f"{as_daemon} touch {target}")

    with subtest("the lease names the host"):
        machine.wait_until_succeeds(
            "nats kv get owners owners.main --raw | jq -e '.host == \"machine\"'", timeout=30
        )

    with subtest("a serial port that appears after start is opened and read"):
        machine.succeed(
            "mkdir -p /run/presenced-test && systemd-run --unit=radar socat -u"
            " PIPE:/run/presenced-test/feed,ignoreeof"
            " PTY,link=/run/presenced-test/radar,raw,echo=0,group=dialout,mode=0660"
        )
        # socat makes the pty when the first line arrives.
        machine.wait_until_succeeds("test -p /run/presenced-test/feed")
        machine.wait_until_succeeds(
            "printf '{\"sensor\":\"desk_radar\",\"value\":true}\\n' > /run/presenced-test/feed"
            " && nats kv get presence desk --raw | jq -e '.state == \"occupied\"'",
            timeout=60,
        )

    with subtest("a replug under another node is opened again and read"):
        old = machine.succeed("readlink /run/presenced-test/radar").strip()
        machine.succeed("systemctl stop radar && rm -f /run/presenced-test/feed")
        # Another pty takes the freed node, as another device would ttyUSB0.
        machine.succeed(
            "systemd-run --unit=hold socat PTY,link=/run/presenced-test/hold SYSTEM:'sleep 600'"
        )
        machine.wait_until_succeeds("test -L /run/presenced-test/hold")
        machine.succeed(
            "systemd-run --unit=radar2 socat -u PIPE:/run/presenced-test/feed,ignoreeof"
            " PTY,link=/run/presenced-test/radar,raw,echo=0,group=dialout,mode=0660"
        )
        machine.wait_until_succeeds("test -p /run/presenced-test/feed")
        stored = int(machine.succeed("nats stream info SENSORS --json | jq .state.messages"))
        machine.wait_until_succeeds(
            "printf '{\"sensor\":\"desk_radar\",\"value\":true}\\n' > /run/presenced-test/feed"
            f" && test $(nats stream info SENSORS --json | jq .state.messages) -gt {stored}",
            timeout=30,
        )
        new = machine.succeed("readlink /run/presenced-test/radar").strip()
        assert new != old, f"the replug got the same node {new}"

    with subtest("the device policy is closed but for the allowed class"):
        # A shell in the unit's cgroup: /dev/null (allowed by the closed
        # policy) opens, /dev/ptmx (5:2, not allowed) does not.
        cg = "/sys/fs/cgroup/system.slice/presenced-main.service/cgroup.procs"
        machine.succeed(f"sh -c 'echo $$ > {cg} && exec true < /dev/null'")
        machine.fail(f"sh -c 'echo $$ > {cg} && exec true < /dev/ptmx'")

    with subtest("the watchdog kills a frozen daemon and systemd restarts it"):
        pid = machine.succeed("systemctl show -P MainPID presenced-main").strip()
        restarts = int(machine.succeed("systemctl show -P NRestarts presenced-main"))
        machine.succeed(f"kill -STOP {pid}")
        # WatchdogSec (10 s) plus RestartSec (2 s) plus a start.
        machine.wait_until_succeeds(
            f"test \"$(systemctl show -P MainPID presenced-main)\" != {pid}"
            " && systemctl is-active presenced-main",
            timeout=40,
        )
        machine.succeed("journalctl -u presenced-main | grep -q 'Watchdog timeout'")
        assert int(machine.succeed("systemctl show -P NRestarts presenced-main")) == restarts + 1

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
