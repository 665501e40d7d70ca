# A minimal stand-in for nixpkgs' `pkgs`, for evaluating and building the
# NixOS modules on a machine without nixpkgs: just the builders and packages
# the modules, the NixOS subset and the test nodes name.
#
# Builders are real derivations built by the local Nix with the host's
# /bin/sh and tools (the store has no stdenv here), so every build step a
# module defines (check-config, acl, acl-hub, nats-server -t, unit files)
# really runs. Packages are store paths whose bin/ links to binaries built
# or installed on this machine (the presenced cargo built, the nats-server
# of the tools cache, the system's Mosquitto); each records the hash of the binary,
# so a new build of it gives a new store path.
{
  lib,
  # Absolute paths of the binaries behind the packages that run.
  tools,
  system ? builtins.currentSystem,
}:

let
  hostPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

  # A derivation that can be overridden as the NixOS libraries do
  # (`overrideAttrs` on script packages).
  mkDrv =
    attrs:
    let
      drv = derivation (
        removeAttrs attrs [
          "meta"
          "passthru"
          "nativeBuildInputs"
        ]
        // {
          inherit system;
          builder = "/bin/sh";
        }
      );
    in
    drv
    // {
      meta = attrs.meta or { };
      overrideAttrs = f: mkDrv (attrs // f attrs);
    };

  runCommand =
    name: env: script:
    mkDrv (
      env
      // {
        inherit name;
        args = [
          "-e"
          "-c"
          script
        ];
        PATH = lib.concatStringsSep ":" (
          map (p: "${p}/bin") (lib.filter (p: p != null) (env.nativeBuildInputs or [ ])) ++ [ hostPath ]
        );
      }
    );

  writeTextFile =
    {
      name,
      text,
      executable ? false,
      destination ? "",
      meta ? { },
    }:
    runCommand name
      {
        inherit text meta;
        passAsFile = [ "text" ];
      }
      ''
        target="$out${destination}"
        mkdir -p "$(dirname "$target")"
        cp "$textPath" "$target"
        ${lib.optionalString executable ''chmod +x "$target"''}
      '';

  writeText = name: text: writeTextFile { inherit name text; };
  writeScript =
    name: text:
    writeTextFile {
      inherit name text;
      executable = true;
    };
  writeShellScript = name: text: writeScript name "#!/bin/sh\n${text}";
  writeShellScriptBin =
    name: text:
    writeTextFile {
      inherit name;
      text = "#!/bin/sh\n${text}";
      executable = true;
      destination = "/bin/${name}";
      meta.mainProgram = name;
    };

  # A package whose bin/ holds links to binaries of this machine.
  linkPackage =
    name: bins:
    runCommand name
      {
        # A rebuilt binary is a new store path.
        hashes = lib.mapAttrsToList (_: path: builtins.hashFile "sha256" path) bins;
      }
      ''
        mkdir -p "$out/bin"
        ${lib.concatStrings (
          lib.mapAttrsToList (bin: path: ''
            ln -s ${lib.escapeShellArg path} "$out/bin/${bin}"
          '') bins
        )}
      ''
    // {
      meta.mainProgram = name;
      pname = name;
    };

  # The host's /usr/bin as a package (coreutils, jq, ...): inside the
  # systemd-nspawn test the same links resolve to the container's /usr/bin.
  systemPackage =
    name:
    runCommand name { } ''
      mkdir -p "$out"
      ln -s /usr/bin "$out/bin"
    ''
    // {
      meta.mainProgram = name;
      pname = name;
    };

  # nixpkgs' JSON value type, as pkgs.formats declares it.
  jsonValue =
    with lib.types;
    let
      valueType =
        nullOr (oneOf [
          bool
          int
          float
          str
          path
          (attrsOf valueType)
          (listOf valueType)
        ])
        // {
          description = "JSON value";
        };
    in
    valueType;

  # Converted from JSON with Python's json module and the writer next to
  # this file (nixpkgs uses remarshal).
  toTOML =
    name: value:
    runCommand name
      {
        json = builtins.toJSON value;
        passAsFile = [ "json" ];
      }
      ''
        python3 ${./json2toml.py} < "$jsonPath" > "$out"
      '';

  pkgs = {
    inherit
      lib
      runCommand
      writeText
      writeTextFile
      writeScript
      writeShellScript
      writeShellScriptBin
      ;
    stdenv = {
      buildPlatform = lib.systems.elaborate system;
      hostPlatform = lib.systems.elaborate system;
    };
    buildPackages = pkgs;
    runtimeShell = "/bin/sh";
    callPackage = f: args: f (builtins.intersectAttrs (builtins.functionArgs f) pkgs // args);
    writeShellApplication =
      { name, text, ... }:
      writeShellScriptBin name ''
        set -o errexit -o nounset -o pipefail
        ${text}
      '';

    formats = {
      json = _: {
        type = jsonValue;
        generate = name: value: writeText name (builtins.toJSON value);
      };
      toml = _: {
        type = jsonValue;
        generate = toTOML;
      };
    };

    presenced = linkPackage "presenced" { presenced = tools.presenced; };
    nats-server = linkPackage "nats-server" { nats-server = tools.nats-server; };
    # The NixOS module requires 2.1 (its config uses the acl-file and
    # password-file plugins): the version is nixos-26.05's, the binary this
    # machine's (Debian's 2.0 cannot load the rendered config; the nspawn
    # test runs it with a config of its own).
    mosquitto =
      linkPackage "mosquitto" {
        mosquitto = tools.mosquitto;
        mosquitto_passwd = tools.mosquitto_passwd;
      }
      // {
        version = "2.1.2";
      };
    coreutils = systemPackage "coreutils";
    findutils = systemPackage "findutils";
    gnugrep = systemPackage "gnugrep";
    gnused = systemPackage "gnused";
    jq = systemPackage "jq";
    curl = systemPackage "curl";
    systemd = systemPackage "systemd";
    # Named by the test nodes' system packages only; nothing here runs it.
    natscli = systemPackage "natscli";
    seaweedfs = linkPackage "seaweedfs" { weed = tools.weed; };
  };
in
pkgs
