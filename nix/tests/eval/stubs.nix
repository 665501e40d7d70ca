# Just enough of NixOS and nixpkgs for evaluating presenced's modules with
# nothing but nixpkgs' `lib`: the options those modules write to, with the
# merge behaviour they rely on, and packages as named placeholders. Builders
# return store-like strings named after what they would build, so tests can
# see which file ended up where without building anything.
{ lib }:

let
  inherit (lib) mkOption types;

  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = "${builtins.storeDir}/00000000000000000000000000000000-${name}";
    meta.mainProgram = name;
  };

  fakeFile = name: "${builtins.storeDir}/00000000000000000000000000000000-${name}";

  # systemd unit options concatenate lists and otherwise want one value,
  # as NixOS' unitOption does.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.any (def: lib.isList def.value) defs' then
        lib.concatMap (def: lib.toList def.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };

  format = {
    type = types.attrsOf types.anything;
    generate = name: _value: fakeFile name;
  };

  pkgs = rec {
    stdenv = {
      buildPlatform = lib.systems.elaborate "x86_64-linux";
      hostPlatform = lib.systems.elaborate "x86_64-linux";
    };
    # The eval tests build nothing; build-time tools are the same stand-ins.
    buildPackages = pkgs;
    formats = {
      toml = _: format;
      json = _: format;
    };
    runCommand =
      name: _env: _script:
      fakeFile name;
    writeText = name: _text: fakeFile name;
    writeShellScript = name: _text: fakeFile name;
    presenced = fakePackage "presenced";
    nats-server = fakePackage "nats-server";
    natscli = fakePackage "natscli";
    jq = fakePackage "jq";
    coreutils = fakePackage "coreutils";
  };

  serviceType = types.submodule {
    options = {
      description = mkOption {
        type = types.str;
        default = "";
      };
      documentation = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      wantedBy = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      wants = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      requires = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      after = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      before = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      serviceConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
    };
  };

  nixos = {
    options = {
      assertions = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      warnings = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      networking.hostName = mkOption {
        type = types.str;
        default = "nixos";
      };
      networking.firewall.allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
      networking.firewall.interfaces = mkOption {
        type = types.attrsOf (
          types.submodule {
            options.allowedTCPPorts = mkOption {
              type = types.listOf types.port;
              default = [ ];
            };
          }
        );
        default = { };
      };
      environment.etc = mkOption {
        type = types.attrsOf (types.submodule { options.source = mkOption { type = types.str; }; });
        default = { };
      };
      environment.systemPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
      systemd.services = mkOption {
        type = types.attrsOf serviceType;
        default = { };
      };
      # The options of nixpkgs' services.nats that the leaf and hub set.
      services.nats = {
        enable = lib.mkEnableOption "nats";
        jetstream = lib.mkEnableOption "JetStream";
        serverName = mkOption {
          type = types.str;
          default = "nats";
        };
        port = mkOption {
          type = types.port;
          default = 4222;
        };
        dataDir = mkOption {
          type = types.str;
          default = "/var/lib/nats";
        };
        settings = mkOption {
          type = format.type;
          default = { };
        };
      };
    };
    config._module.args.pkgs = pkgs;
  };
in
{
  inherit pkgs fakeFile;

  # Evaluates modules on top of the stubs and returns their config.
  eval = modules: (lib.evalModules { modules = [ nixos ] ++ modules; }).config;

  # Messages of the assertions that fail.
  failedAssertions = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
}
