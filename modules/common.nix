# Options shared by the presenced, nats-leaf and nats-hub modules. Each of
# them imports this file; the module system loads it once.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib) literalExpression mkOption types;
  cfg = config.services.presenced;
  inherit (pkgs.stdenv) buildPlatform hostPlatform;
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

    buildPackage = mkOption {
      type = types.nullOr types.package;
      default = if buildPlatform.canExecute hostPlatform then cfg.package else null;
      defaultText = literalExpression ''
        config.services.presenced.package when the build machine can run it, else null
      '';
      description = ''
        The presenced that runs while the system is built: `check-config`
        on every rendered config, `acl`/`acl-hub` for the authorization
        blocks and `nats-config` for the nats-server configs. When
        building for another platform (an aarch64 board from an x86_64
        machine), the target's binary cannot run on the build machine:
        give the build machine's presenced here (the flake's modules do,
        from `packages.<build system>.default`). Null turns the daemons'
        config checks off; a leaf or hub node, whose configs presenced
        renders, then cannot be built (refused at evaluation).
        Use the same version as {option}`package`.
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
