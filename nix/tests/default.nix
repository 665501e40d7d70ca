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
      defaults = import ./defaults.nix { inherit pkgs self; };
    };
in
# One test per file of files.nix (the render tests read the same list).
pkgs.lib.genAttrs (import ./files.nix) (test: runTest (./. + "/${test}.nix"))
