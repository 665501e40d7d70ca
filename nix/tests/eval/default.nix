# Runs every evaluation test against the given nixpkgs `lib` and returns the
# failures (`lib.runTests` format): an empty list means all passed.
{ lib }:

let
  suites = {
    presenced = import ./presenced.nix { inherit lib; };
    nats-leaf = import ./nats-leaf.nix { inherit lib; };
    nats-hub = import ./nats-hub.nix { inherit lib; };
  };

  # Test names carry their suite, so a failure says where it came from.
  tests = lib.concatMapAttrs (
    suite: lib.mapAttrs' (name: lib.nameValuePair "${name} (${suite})")
  ) suites;

  # lib.runTests only runs attributes whose name starts with "test".
  failures = lib.runTests tests;
in
{
  inherit failures;
  count = lib.length (lib.attrNames tests);
}
