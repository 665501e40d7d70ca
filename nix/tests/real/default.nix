# The render tests: every host in hosts/, every node of every VM test and
# every container in them, evaluated against the real NixOS declarations of
# the NixOS subset (../shared/nixos-subset from the checkout) and built: the
# build steps the modules define run (check-config, acl, acl-hub,
# nats-server -t), and every unit file is rendered.
#
# Builds one directory, <system>/<unit file>, where a system is
# `host-<name>`, `vm-<test>-<node>`, `nspawn-edge` (the edge example as the
# nspawn boot test runs it) or `<system>-container-<name>`.
# Evaluation fails, naming the system, on any failed assertion; warnings
# are listed in <system>/WARNINGS.
#
# Usage (scripts/nix-check.sh): nix-build nix/tests/real --arg subset PATH
#   --argstr presenced BIN --argstr natsServer BIN --argstr mosquitto BIN
#   --argstr mosquittoPasswd BIN --argstr weed BIN --argstr nspawnKeys DIR
{
  subset,
  presenced,
  natsServer,
  mosquitto,
  mosquittoPasswd,
  weed,
  # Directory of the NKEYs of the nspawn system (<service>.nk.pub, read at
  # evaluation; the seeds beside them never enter the store).
  nspawnKeys,
}:

let
  lib = import (subset + "/nixpkgs-lib/lib");
  system = builtins.currentSystem;
  pkgs = import ./pkgs.nix {
    inherit lib system;
    tools = {
      inherit presenced mosquitto;
      nats-server = natsServer;
      mosquitto_passwd = mosquittoPasswd;
      inherit weed;
    };
  };
  evalNixos = import ./nixos.nix { inherit lib subset pkgs; };

  # The flake's outputs the VM tests use, on the stand-in pkgs.
  self = {
    nixosModules.default = {
      imports = [
        ../../../modules/presenced.nix
        ../../../modules/nats-leaf.nix
        ../../../modules/nats-hub.nix
      ];
    };
    packages.${system} = {
      presenced = pkgs.presenced;
      default = pkgs.presenced;
    };
  };

  hosts = lib.genAttrs [ "edge-example" "hub-1" "hub-2" "hub-3" ] (
    name: (evalNixos [ (../../../hosts + "/${name}.nix") ]).config
  );

  vmTests = lib.genAttrs (import ../files.nix) (
    test:
    let
      t = import (../. + "/${test}.nix") { inherit pkgs lib self; };
    in
    lib.mapAttrs (
      node: module:
      (evalNixos [
        module
        (import ../defaults.nix { inherit pkgs self; })
        # The test driver names each node's host after the node.
        { networking.hostName = lib.mkDefault node; }
      ]).config
    ) t.nodes
  );

  # The system the systemd-nspawn boot test installs (nspawn-edge.nix).
  nspawnEdge = (evalNixos [ (import ./nspawn-edge.nix { keys = nspawnKeys; }) ]).config;

  topLevel =
    lib.mapAttrs' (name: lib.nameValuePair "host-${name}") hosts
    // {
      nspawn-edge = nspawnEdge;
    }
    // lib.concatMapAttrs (
      test: nodes: lib.mapAttrs' (node: lib.nameValuePair "vm-${test}-${node}") nodes
    ) vmTests;

  systems =
    topLevel
    // lib.concatMapAttrs (
      name: config:
      lib.mapAttrs' (container: c: lib.nameValuePair "${name}-container-${container}" c.config) (
        config.containers or { }
      )
    ) topLevel;

  failures = lib.concatLists (
    lib.mapAttrsToList (
      name: config: map (a: "${name}: ${a.message}") (lib.filter (a: !a.assertion) config.assertions)
    ) systems
  );

  units = config: lib.filterAttrs (_: unit: unit.enable) config.systemd.units;

  render =
    pkgs.runCommand "presenced-rendered-units"
      {
        passAsFile = [ "warnings" ];
        warnings = lib.concatStrings (
          lib.mapAttrsToList (
            name: config:
            lib.concatMapStrings (w: "${name}\t${builtins.replaceStrings [ "\n" ] [ " " ] w}\n") config.warnings
          ) systems
        );
      }
      ''
        mkdir "$out"
        cp "$warningsPath" "$out/WARNINGS"
        ${lib.concatStrings (
          lib.mapAttrsToList (name: config: ''
            mkdir "$out/${name}"
            ${lib.concatStrings (
              lib.mapAttrsToList (unitName: unit: ''
                cp ${unit.unit}/${lib.escapeShellArg unitName} "$out/${name}/"
              '') (units config)
            )}
          '') systems
        )}
      '';
in
if failures == [ ] then
  render
else
  throw "render tests: failed assertions:\n${lib.concatStringsSep "\n" failures}"
