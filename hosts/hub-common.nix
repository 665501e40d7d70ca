# What the three hub nodes share: the node list and the hub settings. Each
# hub-N.nix adds only its host name, which selects the node.
{ ... }:

{
  services.presenced.hub = {
    enable = true;
    nodes = {
      hub-1 = "192.0.2.11";
      hub-2 = "192.0.2.12";
      hub-3 = "192.0.2.13";
    };
    jetstream.maxFile = "200G";
    # Public NKEY of each site's leaf (from `presenced keygen`), by site:
    # leafNkeys.home = "U...";
    # The sites whose mirrors presenced-provision-hub creates on start.
    provision.sites = [ "home" ];
    # With leafNkeys declared, the admin identity that provisions:
    # adminNkey = "U...";
    # provision.nkeySeedFile = "/var/lib/secrets/presenced/admin.nk";
    # Read-only identities for `presenced dashboard` (the fleet page):
    # viewerNkeys = [ "U..." ];
  };

  # Replace with the node's hardware-configuration.nix.
  boot.loader.grub.device = "/dev/sda";
  fileSystems."/" = {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
  };

  system.stateVersion = "26.05";
}
