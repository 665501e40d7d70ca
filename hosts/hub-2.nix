# Hub node 2 of 3.
{ ... }:

{
  imports = [ ./hub-common.nix ];
  networking.hostName = "hub-2";
}
