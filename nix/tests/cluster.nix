# Three hub nodes and one edge: the hub's mirror of the site converges;
# with hub2 stopped and the edge's link cut, the edge keeps taking
# readings; once the link is back the hub catches up with nothing missing.
#
# Depends on the cluster features still being built: the leaf link and the
# hub mirrors as `presenced provision` will create them. Until then the
# script creates the mirrors with the NATS CLI, the way provision is meant
# to (a mirror across domains names the leaf's API prefix).
{ lib, pkgs, ... }:

let
  site = "edge";
  nodes = {
    hub1 = "hub1";
    hub2 = "hub2";
    hub3 = "hub3";
  };
  hub = name: {
    virtualisation.memorySize = 1024;
    services.presenced.hub = {
      enable = true;
      nodeName = name;
      inherit nodes;
      # Admin tools in the test talk to the hub from the node itself.
      host = "127.0.0.1";
    };
  };
  sensorsMirror = pkgs.writeText "sensors-mirror.json" (
    builtins.toJSON {
      name = "SENSORS-${site}";
      storage = "file";
      num_replicas = 3;
      mirror = {
        name = "SENSORS";
        external.api = "$JS.leaf-${site}.API";
      };
    }
  );
in
{
  name = "presenced-cluster";

  nodes = {
    hub1 = hub "hub1";
    hub2 = hub "hub2";
    hub3 = hub "hub3";

    edge = {
      imports = [ ./mosquitto.nix ];
      services.presenced = {
        inherit site;
        leaf = {
          enable = true;
          hub.urls = lib.mapAttrsToList (name: _: "nats-leaf://${name}:7422") nodes;
        };
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
      };
    };
  };

  testScript = ''
    hubs = [hub1, hub2, hub3]

    def publish(count, offset):
        edge.succeed(
            f"for i in $(seq {offset} {offset + count - 1}); do"
            " v=$([ $((i % 2)) = 0 ] && echo true || echo false);"
            " mosquitto_pub -h 127.0.0.1 -q 1 -t zigbee2mqtt/hall_pir"
            " -m \"{\\\"occupancy\\\":$v,\\\"seq\\\":$i}\"; done"
        )

    def last_seq(node, stream):
        return int(node.succeed(f"nats stream info {stream} --json | jq .state.last_seq").strip())

    def converged(nodes):
        want = last_seq(edge, "SENSORS")
        for node in nodes:
            node.wait_until_succeeds(
                f"test \"$(nats stream info SENSORS-${site} --json | jq .state.last_seq)\" = {want}",
                timeout=180,
            )

    start_all()
    for node in hubs:
        node.wait_for_unit("nats.service")
    edge.wait_for_unit("presenced-main.service")
    edge.wait_until_succeeds("curl -sf http://127.0.0.1:8222/leafz | jq -e '.leafnodes >= 1'")

    with subtest("the hub mirror converges"):
        hub1.wait_until_succeeds("nats stream add --config ${sensorsMirror}", timeout=120)
        hub1.wait_until_succeeds(
            "nats kv add presence-${site} --mirror presence --mirror-domain leaf-${site} --replicas 3"
        )
        publish(20, 0)
        converged(hubs)

    with subtest("hub2 down and the edge cut off: the edge keeps going"):
        hub2.succeed("systemctl stop nats.service")
        edge.succeed("ip link set eth1 down")
        before = last_seq(edge, "SENSORS")
        publish(30, 20)
        edge.wait_until_succeeds(f"test $(nats stream info SENSORS --json | jq .state.last_seq) -ge {before + 30}")

    with subtest("link restored: the hub converges, nothing missing"):
        edge.succeed("ip link set eth1 up")
        converged([hub1, hub3])
        total = last_seq(edge, "SENSORS")
        for node in [hub1, hub3]:
            node.succeed(
                f"test $(nats stream info SENSORS-${site} --json | jq .state.messages) = {total}"
            )
        hub2.succeed("systemctl start nats.service")
        converged([hub2])
  '';
}
