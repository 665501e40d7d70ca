# The edge-example host in a VM: its containers boot, the daemons in them
# report READY, and a motion message travels from Mosquitto on the host
# through the ingest container and the leaf to the engine container.
{ lib, ... }:

{
  name = "presenced-containers";

  nodes.machine = {
    imports = [ ../../hosts/edge-example.nix ];

    virtualisation.memorySize = 2048;
    boot.loader.generic-extlinux-compatible.enable = lib.mkForce false;

    # The VM has no USB serial adapter; its second UART stands in.
    containers.ingest.allowedDevices = lib.mkForce [
      {
        node = "/dev/ttyS1";
        modifier = "rw";
      }
    ];
    containers.ingest.bindMounts = lib.mkForce {
      "/dev/ttyUSB0" = {
        hostPath = "/dev/ttyS1";
        isReadOnly = false;
      };
    };
  };

  testScript = ''
    start_all()
    machine.wait_for_unit("nats.service")
    machine.wait_for_unit("mosquitto.service")
    machine.wait_for_unit("presenced-provision.service")

    for name in ["ingest", "engine"]:
        with subtest(f"container {name} boots and its daemon is READY"):
            machine.wait_for_unit(f"container@{name}.service")
            # Type=notify: `active` means the daemon sent READY=1.
            machine.wait_until_succeeds(
                f"nixos-container run {name} -- systemctl is-active presenced-{name}.service",
                timeout=120,
            )
            machine.succeed(
                f"test \"$(nixos-container run {name} -- systemctl show -P Type presenced-{name})\" = notify"
            )

    with subtest("a reading crosses the containers"):
        machine.succeed(
            "mosquitto_pub -h 127.0.0.1 -q 1 -t zigbee2mqtt/hall_pir -m '{\"occupancy\":true}'"
        )
        machine.wait_until_succeeds(
            "nats kv get presence hall --raw | jq -e '.state == \"occupied\"'", timeout=60
        )
  '';
}
