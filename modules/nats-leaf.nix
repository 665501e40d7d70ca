# services.presenced.leaf: the site's leaf nats-server, on top of nixpkgs'
# services.nats. It holds all of presenced's durable state (JetStream domain
# `leaf-<site>`) and, when a hub is set, links to it as a leaf node so the
# hub can mirror the site.
#
# The server's config is rendered at build time by `presenced nats-config
# leaf` from the description below (the one writer of nats-server configs,
# also used by the sandbox and the tests) and checked with `nats-server -t`.
# Secrets never enter the store: the leafnode NKEY seed is a systemd
# credential, written beside a copy of the config under /run/nats-leaf when
# the server starts. The authorization block holds public keys only and is
# rendered at build time by `presenced acl` from the declared access map.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    literalExpression
    mkDefault
    mkEnableOption
    mkForce
    mkIf
    mkMerge
    mkOption
    optionalAttrs
    optionalString
    types
    ;

  cfg = config.services.presenced.leaf;
  inherit (import ./sync-interval.nix { inherit lib; }) syncIntervalType;
  site = cfg.site;
  domain = "leaf-${site}";

  tomlFormat = pkgs.formats.toml { };
  presenced = config.services.presenced.buildPackage;

  hasRemote = cfg.hub.urls != [ ];
  hasSeed = cfg.hub.nkeySeedFile != null;
  runtimeDir = "/run/nats-leaf";

  # The leaf as `presenced nats-config leaf` reads it: the one renderer of
  # nats-server configs (the sandbox and the tests use it too). Includes
  # are relative to the rendered file's directory.
  description = {
    inherit site;
    server_name = config.services.nats.serverName;
    listen = "${cfg.host}:${toString cfg.port}";
    monitor_port = cfg.monitorPort;
    jetstream = {
      store_dir = config.services.nats.dataDir;
      sync_interval =
        if cfg.jetstream.syncInterval == null then "server-default" else cfg.jetstream.syncInterval;
    }
    // optionalAttrs (cfg.jetstream.maxMemory != null) { max_memory = cfg.jetstream.maxMemory; }
    // optionalAttrs (cfg.jetstream.maxFile != null) { max_file = cfg.jetstream.maxFile; };
  }
  // optionalAttrs hasRemote {
    hub = {
      inherit (cfg.hub) urls;
    }
    # Written from the credential when the server starts.
    // optionalAttrs hasSeed { nkey_include = "leaf-nkey.conf"; };
  }
  // optionalAttrs cfg.authorization.enable { authorization_include = "authorization.conf"; };

  # The access map as `presenced acl` reads it.
  accessFile = tomlFormat.generate "presenced-access-${site}.toml" cfg.authorization.access;

  # Where the authorization block is produced: `presenced acl` turns the
  # ownership map (public keys and the services they belong to) into NKEY
  # users with allow lists, deny by default. Nothing here is secret. A
  # pre-rendered file replaces the step when asked to.
  authorizationFile =
    if cfg.authorization.file != null then
      cfg.authorization.file
    else
      pkgs.runCommand "nats-leaf-${site}-authorization.conf" { nativeBuildInputs = [ presenced ]; } ''
        presenced acl --access ${accessFile} --site ${site} > "$out"
      '';

  # The config directory: rendered by `presenced nats-config leaf`, with
  # the authorization block beside it, and checked with `nats-server -t`
  # (a throwaway seed stands in for the credential in the check only).
  configDir =
    pkgs.runCommand "nats-leaf-${site}-conf"
      {
        nativeBuildInputs = [
          presenced
          pkgs.buildPackages.nats-server
        ];
      }
      ''
        mkdir "$out"
        presenced nats-config leaf ${tomlFormat.generate "nats-leaf-${site}.toml" description} > "$out/nats.conf"
        ${optionalString cfg.authorization.enable ''cp ${authorizationFile} "$out/authorization.conf"''}
        mkdir check
        cp "$out"/* check/
        ${optionalString hasSeed ''
          presenced keygen --out check/throwaway.nk leaf > /dev/null
          printf 'nkey: "%s"\n' "$(cat check/throwaway.nk)" > check/leaf-nkey.conf
        ''}
        nats-server -c check/nats.conf -t
      '';

  # The seed joins the config in a private runtime directory at start.
  assemble = pkgs.writeShellScript "nats-leaf-assemble-config" ''
    set -eu
    umask 0077
    ${pkgs.coreutils}/bin/cp ${configDir}/* ${runtimeDir}/
    seed="$(${pkgs.coreutils}/bin/tr -d '[:space:]' < "$CREDENTIALS_DIRECTORY/leaf-nkey-seed")"
    printf 'nkey: "%s"\n' "$seed" > ${runtimeDir}/leaf-nkey.conf
  '';
in
{
  imports = [
    ./common.nix
    (lib.mkChangedOptionModule
      [ "services" "presenced" "leaf" "jetstream" "syncAlways" ]
      [ "services" "presenced" "leaf" "jetstream" "syncInterval" ]
      (config: if config.services.presenced.leaf.jetstream.syncAlways then "always" else "1s")
    )
  ];

  options.services.presenced.leaf = {
    enable = mkEnableOption "the site's leaf nats-server for presenced";

    description = mkOption {
      type = types.attrs;
      readOnly = true;
      internal = true;
      description = "The leaf as handed to `presenced nats-config leaf` (TOML).";
    };

    configDir = mkOption {
      type = types.path;
      readOnly = true;
      internal = true;
      description = "The rendered and checked config directory of the server.";
    };

    site = mkOption {
      type = types.strMatching "[a-z0-9-]{1,32}";
      default = config.services.presenced.site;
      defaultText = literalExpression "config.services.presenced.site";
      description = "The site id; the JetStream domain is `leaf-<site>`.";
    };

    host = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = ''
        Address clients connect to. Loopback suffices when presenced runs
        on this host; containers with a private network reach the host at
        its container-side address, so listen on that (or on `0.0.0.0`
        with the port opened only on the container interfaces, see
        {option}`openFirewallOn`).
      '';
    };

    port = mkOption {
      type = types.port;
      default = 4222;
      description = "Client port.";
    };

    openFirewallOn = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "ve-+" ];
      description = ''
        Interfaces on which the client port is opened in the firewall;
        `ve-+` covers the host side of every nixos-container. Nothing is
        opened on other interfaces.
      '';
    };

    monitorPort = mkOption {
      type = types.port;
      default = 8222;
      description = "HTTP monitoring port, bound to 127.0.0.1 only.";
    };

    jetstream = {
      maxMemory = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "256M";
        description = "Upper bound of JetStream memory storage (`max_mem`).";
      };
      maxFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "20G";
        description = "Upper bound of JetStream file storage (`max_file`).";
      };
      syncInterval = mkOption {
        type = syncIntervalType;
        default = "1s";
        example = "always";
        description = ''
          How often JetStream fsyncs stored writes (`sync_interval`).
          JetStream acknowledges a write before it reaches the disk; a host
          that loses power loses what was acknowledged since the last sync.
          `"1s"` (the default) puts about a second at risk at a cost within
          the run-to-run noise; `"always"` syncs before every
          acknowledgement and loses nothing, at about a twentieth of the
          pipelined KV put rate (a fiftieth on a loaded host) and a half to
          a third of the one-at-a-time rate (docs/PERFORMANCE.md). `null` leaves nats-server's own default,
          2 minutes.
        '';
      };
    };

    hub = {
      urls = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [
          "nats-leaf://hub-1.example.net:7422"
          "nats-leaf://hub-2.example.net:7422"
          "nats-leaf://hub-3.example.net:7422"
        ];
        description = ''
          Leafnode URLs of the hub nodes. Empty: the site runs on its own,
          without a hub.
        '';
      };
      nkeySeedFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = "/var/lib/secrets/presenced/leaf.nk";
        description = ''
          File holding the NKEY seed the leaf authenticates to the hub with
          (its public key goes into the hub's
          {option}`services.presenced.hub.leafNkeys`). Loaded with
          `LoadCredential=`; it never enters the store.
        '';
      };
    };

    authorization = {
      enable = mkEnableOption ''
        NKEY authorization on the leaf, rendered by `presenced acl` from
        {option}`services.presenced.leaf.authorization.access`: each service
        may write only its own keyspace; everything else is denied'';

      access = mkOption {
        type = tomlFormat.type;
        default = { };
        example = literalExpression ''
          {
            admin.nkey = "UA…";
            services = {
              ingest = { nkey = "UB…"; runs = [ "ingest" ]; };
              engine = { nkey = "UC…"; runs = [ "engine" "archiver" ]; };
            };
          }
        '';
        description = ''
          The ownership map handed to `presenced acl --access`: the admin
          identity (provisioning only), the leafnode identity, and each
          service with its public NKEY, the components it `runs` (which
          decide the keyspaces it writes) and the keyspaces it `reads`
          beyond its own. Public keys only, never seeds; the file lands in
          the store. docs/SECURITY.md describes the format.
        '';
      };

      file = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = literalExpression "./leaf-home-authorization.conf";
        description = ''
          The authorization block, rendered beforehand with
          `presenced acl --access FILE --site SITE`, instead of rendering
          {option}`access` at build time. Public keys only: it lands in
          the store.
        '';
      };
    };
  };

  config = mkIf cfg.enable {
    services.presenced.leaf = { inherit description configDir; };

    assertions = [
      {
        assertion = !hasSeed || !(lib.hasPrefix "${builtins.storeDir}/" (toString cfg.hub.nkeySeedFile));
        message = ''
          services.presenced.leaf.hub.nkeySeedFile is in the Nix store, which
          every local user can read; keep the seed outside the store.
        '';
      }
      {
        assertion = presenced != null;
        message = ''
          services.presenced.leaf: the leaf's config is rendered at build time
          by `presenced nats-config leaf`, but services.presenced.buildPackage
          is null: set it to a presenced the build machine can run (on a
          cross build, the build machine's own).
        '';
      }
      {
        assertion = !hasSeed || hasRemote;
        message = "services.presenced.leaf.hub.nkeySeedFile is set but hub.urls is empty.";
      }
    ];

    # nixpkgs' services.nats brings the unit, its user and state directory
    # and its sandbox; the config it would render from `settings` is not
    # used: the server starts on the one `presenced nats-config` renders.
    services.nats = {
      enable = true;
      # Explicit: nixpkgs renders `"jetstream": {}` even when this is off,
      # and an empty block turns JetStream on with default limits.
      jetstream = true;
      serverName = mkDefault domain;
      port = cfg.port;
    };

    systemd.services.nats.serviceConfig = mkMerge [
      {
        ExecStart = mkForce "${pkgs.nats-server}/bin/nats-server -c ${
          if hasSeed then runtimeDir else configDir
        }/nats.conf";
      }
      (mkIf hasSeed {
        RuntimeDirectory = [ "nats-leaf" ];
        RuntimeDirectoryMode = "0700";
        LoadCredential = [ "leaf-nkey-seed:${toString cfg.hub.nkeySeedFile}" ];
        ExecStartPre = [ assemble ];
      })
    ];

    networking.firewall.interfaces = lib.genAttrs cfg.openFirewallOn (_: {
      allowedTCPPorts = [ cfg.port ];
    });

    # `nats` and, for provisioning and `presenced watch --hub` by hand,
    # `presenced`.
    environment.systemPackages = [
      pkgs.natscli
      config.services.presenced.package
    ];
  };
}
