# Three hub nodes and one edge: the hub's mirrors of the site, created by
# `presenced-provision-hub` on the hub nodes, converge; with hub2 stopped
# and the edge's link cut, the edge keeps taking readings; once the link is
# back the daemon's `[hub]` watch nudges the mirrors and the hub catches up
# with nothing missing.
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
      # Every node provisions: the command is idempotent, and whichever
      # node's run comes first once the cluster answers creates the mirrors.
      provision.sites = [ site ];
    };
  };
  mirrors = [
    "SENSORS-${site}"
    "EVENTS-${site}"
    "presence-${site}"
    "owners-${site}"
  ];
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
          # Watch the hub's mirrors through the leaf link and nudge a
          # mirror that is behind once the link is back.
          hub = {
            poll_interval = "1s";
            nudge = true;
            nudge_after = "2s";
          };
        };
      };
    };
  };

  testScript = ''
    hubs = [hub1, hub2, hub3]
    mirrors = ${builtins.toJSON mirrors}

    def publish(count, offset):
        edge.succeed(
            f"for i in $(seq {offset} {offset + count - 1}); do"
            " v=$([ $((i % 2)) = 0 ] && echo true || echo false);"
            " mosquitto_pub -h 127.0.0.1 -q 1 -t zigbee2mqtt/hall_pir"
            " -m \"{\\\"occupancy\\\":$v,\\\"seq\\\":$i}\"; done"
        )

    def last_seq(node, stream):
        return int(node.succeed(f"nats stream info {stream} --json | jq .state.last_seq").strip())

    def converged(nodes, timeout):
        want = last_seq(edge, "SENSORS")
        for node in nodes:
            node.wait_until_succeeds(
                f"test \"$(nats stream info SENSORS-${site} --json | jq .state.last_seq)\" = {want}",
                timeout=timeout,
            )

    start_all()
    for node in hubs:
        node.wait_for_unit("nats.service")
    edge.wait_for_unit("presenced-main.service")
    edge.wait_until_succeeds("curl -sf http://127.0.0.1:8222/leafz | jq -e '.leafnodes >= 1'")

    with subtest("presenced-provision-hub creates the site's mirrors"):
        for node in hubs:
            node.wait_for_unit("presenced-provision-hub.service", timeout=300)
        for name in mirrors:
            stream = name if name.startswith(("SENSORS", "EVENTS")) else f"KV_{name}"
            hub1.succeed(
                f"nats stream info {stream} --json"
                " | jq -e '.config.num_replicas == 3 and .config.mirror.external.api == \"$JS.leaf-${site}.API\"'"
            )

    with subtest("the hub mirrors converge"):
        publish(20, 0)
        converged(hubs, timeout=180)
        edge.wait_until_succeeds("curl -sf http://127.0.0.1:9464/metrics | grep -q '^presenced_hub_reachable 1'", timeout=60)

    with subtest("hub2 down and the edge cut off: the edge keeps going"):
        hub2.succeed("systemctl stop nats.service")
        edge.succeed("ip link set eth1 down")
        before = last_seq(edge, "SENSORS")
        publish(30, 20)
        edge.wait_until_succeeds(f"test $(nats stream info SENSORS --json | jq .state.last_seq) -ge {before + 30}")
        # Long enough for the hub to stop hearing from the mirrors' source,
        # so the mirrors need to resume once the link is back.
        edge.sleep(10)

    with subtest("link restored: the nudged hub catches up, nothing missing"):
        edge.succeed("ip link set eth1 up")
        # The daemon polls every second and nudges after 2 s without
        # contact; the server's own retry backoff can take much longer.
        converged([hub1, hub3], timeout=60)
        # `presenced status --json`: the whole site, with `hub` holding one
        # entry per mirror, read through the leaf's link as the daemon's
        # [hub] watch reads them (the exit code is the site's health, so it
        # is not what is waited for here). Wait for a reading where all
        # mirrors are current.
        edge.wait_until_succeeds(
            "{ presenced status --config /etc/presenced/main.toml --json || true; }"
            " | jq -e '.hub | length == ${toString (builtins.length mirrors)} and all(.state == \"current\" and .lag_messages == 0)'",
            timeout=60,
        )
        total = last_seq(edge, "SENSORS")
        for node in [hub1, hub3]:
            node.succeed(
                f"test $(nats stream info SENSORS-${site} --json | jq .state.messages) = {total}"
            )
        # Reported, not required: the server sometimes resumes a mirror by
        # itself before the daemon's nudge.
        print(edge.succeed("curl -sf http://127.0.0.1:9464/metrics | grep '^presenced_mirror_nudges_total' || true"))
        hub2.succeed("systemctl start nats.service")
        converged([hub2], timeout=180)
  '';
}
