# The edge example as the systemd-nspawn boot test (scripts/nspawn-test.sh)
# runs it: hosts/edge-example.nix with what one booted machine on loopback
# needs instead of its hardware and its private container networks. The
# units of this host and of its two containers are installed side by side
# in one Debian machine, so:
#   - the containers' daemons reach the leaf and Mosquitto at 127.0.0.1
#     (their private networks would need a bridge and addresses outside
#     127.0.0.0/8), and the engine serves /healthz on its own port;
#   - the leaf links to a hub at 127.0.0.1:7422 (nothing listens) with its
#     seed as a credential;
#   - the leaf enforces NKEY authorization with keys made for the test:
#     seeds stay in the test's key directory, outside the store, and reach
#     the units by LoadCredential from /var/lib/secrets/presenced;
#   - the serial port is a pty made after the daemons start
#     (/run/presenced-test/radar), allowed by its class `pts` instead of
#     ttyUSB/ttyACM, and printing JSON lines for zone `desk` (retried
#     every 5 s at most while absent, not 30 s);
#   - the watchdog of the ingest daemon is 5 s, so the test waits less.
{ keys }:
{ lib, ... }:

let
  pub = service: lib.removeSuffix "\n" (builtins.readFile "${keys}/${service}.nk.pub");
  secrets = "/var/lib/secrets/presenced";
  radar = "/run/presenced-test/radar";
in
{
  imports = [ ../../../hosts/edge-example.nix ];

  networking.hostName = lib.mkForce "edge-example";

  services.presenced.leaf = {
    host = lib.mkForce "127.0.0.1";
    # A hub link, so the seed is joined to the config at start; nothing
    # listens there (the site runs on its own, as during a hub outage).
    hub = {
      urls = [ "nats-leaf://127.0.0.1:7422" ];
      nkeySeedFile = "${secrets}/leaf.nk";
    };
    authorization = {
      enable = true;
      access = {
        admin.nkey = pub "admin";
        services = {
          ingest = {
            nkey = pub "ingest";
            runs = [ "ingest" ];
          };
          engine = {
            nkey = pub "engine";
            runs = [ "engine" ];
          };
        };
      };
    };
  };
  services.presenced.provision.nkeySeedFile = "${secrets}/admin.nk";

  containers.ingest.config = {
    services.presenced.instances.ingest = {
      nkeySeedFile = "${secrets}/ingest.nk";
      watchdogSec = "5s";
      serialDevices = lib.mkForce [ radar ];
      serialDeviceClasses = [ "pts" ];
      settings = {
        nats.url = lib.mkForce "nats://127.0.0.1:4222";
        mqtt.z2m.host = lib.mkForce "127.0.0.1";
        serial.radar = {
          device = radar;
          framing = "json_lines";
          sensors = [ "desk_radar" ];
          # Retry the absent port every 5 s at most (30 s by default).
          reconnect_max = "5s";
        };
      };
    };
  };

  containers.engine.config = {
    services.presenced.instances.engine = {
      nkeySeedFile = "${secrets}/engine.nk";
      settings = {
        nats.url = lib.mkForce "nats://127.0.0.1:4222";
        http.listen = "127.0.0.1:9465";
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
      };
    };
  };
}
