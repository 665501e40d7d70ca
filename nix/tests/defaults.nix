# What every VM test node gets: presenced's modules and the tools the test
# scripts call. Shared by the VM tests (default.nix) and the render tests
# (real/), so both evaluate the same nodes.
{ pkgs, self }:

{
  imports = [ self.nixosModules.default ];
  environment.systemPackages = [
    pkgs.curl
    pkgs.jq
    pkgs.mosquitto
    pkgs.natscli
  ];
}
