# Options shared by the presenced, nats-leaf and nats-hub modules. Each of
# them imports this file; the module system loads it once.
{ lib, pkgs, ... }:

let
  inherit (lib) mkOption types;
in
{
  options.services.presenced = {
    package = lib.mkPackageOption pkgs "presenced" { } // {
      description = ''
        The presenced package. It runs the daemons, checks their configs at
        build time and renders the leaf's authorization block, so one
        package keeps all three in step.
      '';
    };

    site = mkOption {
      type = types.nullOr (types.strMatching "[a-z0-9-]{1,32}");
      default = null;
      example = "home";
      description = ''
        The edge host's id. Subjects, the leaf's JetStream domain
        (`leaf-<site>`) and the hub's mirror names all derive from it, so
        it is set once here and used as the default of every instance and
        of the leaf. Lowercase letters, digits and `-`, at most 32
        characters.
      '';
    };
  };
}
