# The NixOS VM tests, one file each. The flake runs them in `checks` (see
# `checkedVmTests` in flake.nix); all of them are reachable as
# `legacyPackages.<system>.vmTests.<name>`.
{ pkgs, self }:

let
  runTest =
    file:
    pkgs.testers.runNixOSTest {
      # Each test file is a function of these, returning the test.
      imports = [
        (import file {
          inherit pkgs self;
          inherit (pkgs) lib;
        })
      ];
      globalTimeout = 20 * 60;
      defaults = {
        imports = [ self.nixosModules.default ];
        environment.systemPackages = [
          pkgs.curl
          pkgs.jq
          pkgs.mosquitto
          pkgs.natscli
        ];
      };
    };
in
{
  basic = runTest ./basic.nix;
  containers = runTest ./containers.nix;
  cluster = runTest ./cluster.nix;
  archive = runTest ./archive.nix;
  acl = runTest ./acl.nix;
}
