# An edge host ("site" home): the leaf nats-server and Mosquitto run on the
# host; presenced runs in two nixos-containers with private networks, ingest
# and engine, so each is its own identity in its own namespace.
#
# A container with privateNetwork cannot reach the host's 127.0.0.1: each
# reaches the leaf and the broker at its hostAddress, and the host opens
# those ports only on the container interfaces (ve-*).
{
  config,
  lib,
  ...
}:

let
  site = "home";

  # The USB serial adapter of the mmWave radar, passed into the ingest
  # container. Prefer a /dev/serial/by-id/ path on real hardware.
  serialDevice = "/dev/ttyUSB0";

  # Device classes (kernel names in /proc/devices) of USB serial adapters.
  # Allowed by class, not by path: systemd resolves a path in DeviceAllow=
  # once, at start, so a port replugged as another ttyUSBn would be denied.
  serialClasses = [
    "ttyUSB"
    "ttyACM"
  ];

  # The host side of each container's veth pair; the leaf and Mosquitto
  # listen on all addresses and the firewall admits only the ve-* side.
  containerNet = {
    ingest = {
      hostAddress = "10.231.1.1";
      localAddress = "10.231.1.2";
    };
    engine = {
      hostAddress = "10.231.2.1";
      localAddress = "10.231.2.2";
    };
  };

  # The package of the host, handed to the containers so both run the same
  # build.
  presencedPackage = config.services.presenced.package;

  container = name: extra: {
    autoStart = true;
    privateNetwork = true;
    inherit (containerNet.${name}) hostAddress localAddress;
    config = {
      imports = [
        ../modules/presenced.nix
        extra
      ];
      services.presenced = {
        inherit site;
        package = presencedPackage;
        instances.${name}.settings.nats.url = "nats://${containerNet.${name}.hostAddress}:4222";
      };
      system.stateVersion = "26.05";
    };
  };
in
{
  networking.hostName = "edge-example";

  services.presenced = {
    inherit site;

    leaf = {
      enable = true;
      host = "0.0.0.0";
      openFirewallOn = [ "ve-+" ];
      # Uncomment once the hub runs (see docs/DEPLOY.md):
      # hub.urls = [
      #   "nats-leaf://hub-1.example.net:7422"
      #   "nats-leaf://hub-2.example.net:7422"
      #   "nats-leaf://hub-3.example.net:7422"
      # ];
      # hub.nkeySeedFile = "/var/lib/secrets/presenced/leaf.nk";
    };

    # Streams and buckets are created on the host, next to the leaf, before
    # the containers' daemons need them.
    provision.enable = true;
  };

  # Zigbee2MQTT publishes here; the ingest container reads it.
  services.mosquitto = {
    enable = true;
    # QoS 1 messages beyond the default queue of 1000 are dropped silently
    # for a subscriber that falls behind; presenced must lose none.
    settings.max_queued_messages = 0;
    listeners = [
      {
        port = 1883;
        omitPasswordAuth = true;
        settings.allow_anonymous = true;
        acl = [ "topic readwrite #" ];
      }
    ];
  };
  networking.firewall.interfaces."ve-+".allowedTCPPorts = [ 1883 ];

  containers.ingest =
    container "ingest" {
      services.presenced.instances.ingest = {
        serialDevices = [ serialDevice ];
        # Sources and no zones: say so, or check-config refuses the file.
        settings.runs = [ "ingest" ];
        settings.mqtt.z2m = {
          host = containerNet.ingest.hostAddress;
          zigbee2mqtt.devices = [
            {
              device = "hall_pir";
              kind = "occupancy";
            }
            {
              device = "front_door";
              kind = "contact";
            }
          ];
        };
      };
    }
    // {
      allowedDevices = map (class: {
        node = "char-${class}";
        modifier = "rw";
      }) serialClasses;
      # The node itself is bound when the container starts: a port that
      # appears later, or comes back under another node after a replug,
      # reaches the container only when it restarts. Run the ingest
      # instance on the host when that matters (its unit allows the whole
      # class and opens the port again by path).
      bindMounts.${serialDevice} = {
        hostPath = serialDevice;
        isReadOnly = false;
      };
    };

  containers.engine = container "engine" {
    services.presenced.instances.engine.settings.zones.hall = {
      arrive_after = "5s";
      leave_after = "2m";
      evidence = [
        {
          sensor = "hall_pir";
          p_true = 0.95;
          p_false = 0.02;
          hold = "2m";
        }
        {
          sensor = "front_door";
          p_true = 0.6;
          p_false = 0.4;
        }
      ];
    };
  };

  # Replace with the board's hardware-configuration.nix.
  boot.loader.grub.enable = false;
  boot.loader.generic-extlinux-compatible.enable = true;
  fileSystems."/" = {
    device = "/dev/disk/by-label/NIXOS_SD";
    fsType = "ext4";
  };

  system.stateVersion = "26.05";
}
