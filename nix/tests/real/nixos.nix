# Evaluates a NixOS configuration from the real option declarations and
# unit rendering of the NixOS subset (lib, systemd, assertions, etc,
# firewall, nats, mosquitto, containers) plus presenced's modules, with the
# stand-in pkgs. Options that NixOS declares outside the subset and that
# the hosts or test nodes set are declared in `outside` below, each named,
# with a loose type: everything else is type-checked as on NixOS, and an
# option nobody declares is an error.
{
  lib,
  subset,
  pkgs,
}:

let
  nixosModules = map (path: subset + "/nixos/modules/${path}") [
    "misc/assertions.nix"
    "system/boot/systemd.nix"
    "system/etc/etc.nix"
    "services/networking/firewall.nix"
    "services/networking/nats.nix"
    "services/networking/mosquitto.nix"
    "virtualisation/nixos-containers.nix"
  ];

  loose =
    default:
    lib.mkOption {
      type = lib.types.anything;
      inherit default;
    };

  outside =
    { config, ... }:
    {
      options = {
        system.stateVersion = lib.mkOption {
          type = lib.types.str;
          default = "26.05";
        };
        nixpkgs.hostPlatform = loose null;
        networking.hostName = lib.mkOption {
          type = lib.types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$";
          default = "nixos";
        };
        networking.useDHCP = loose true;
        networking.interfaces = loose { };
        boot.isNspawnContainer = loose false;
        boot.enableContainers = lib.mkOption {
          type = lib.types.bool;
          default = true;
        };
        boot.loader = loose { };
        fileSystems = loose { };
        environment.systemPackages = lib.mkOption {
          type = lib.types.listOf lib.types.package;
          default = [ ];
        };
        users.users = loose { };
        users.groups = loose { };
        ids.uids = loose { mosquitto = 246; };
        ids.gids = loose { mosquitto = 246; };
        systemd.tmpfiles.rules = lib.mkOption {
          type = lib.types.listOf lib.types.str;
          default = [ ];
        };
        virtualisation.memorySize = loose 1024;
        virtualisation.diskSize = loose 1024;
        virtualisation.cores = loose 1;
        nix = loose { };
      };
      config._module.args = {
        inherit pkgs;
        utils = import (subset + "/nixos/lib/utils.nix") { inherit lib config pkgs; };
      };
    };

  project = [
    ../../../modules/presenced.nix
    ../../../modules/nats-leaf.nix
    ../../../modules/nats-hub.nix
  ];

  eval =
    modules:
    lib.evalModules {
      modules = nixosModules ++ [ outside ] ++ project ++ modules;
      specialArgs = {
        # nixos-containers.nix (subset) evaluates each container with this.
        containerEval = { name, modules }: (eval modules).config;
      };
    };
in
eval
