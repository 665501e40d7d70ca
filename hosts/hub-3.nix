# Hub node 3 of 3.
{ ... }:

{
  imports = [ ./hub-common.nix ];
  networking.hostName = "hub-3";
}
