# Hub node 1 of 3.
{ ... }:

{
  imports = [ ./hub-common.nix ];
  networking.hostName = "hub-1";
}
