# services.presenced.leaf: the site's leaf nats-server, on top of nixpkgs'
# services.nats. It holds all of presenced's durable state (JetStream domain
# `leaf-<site>`) and, when a hub is set, links to it as a leaf node so the
# hub can mirror the site.
#
# Secrets never enter the store: the leafnode NKEY seed is a systemd
# credential, merged into a copy of the config under /run/nats-leaf when
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
    mkOption
    optionalAttrs
    optionalString
    types
    ;

  cfg = config.services.presenced.leaf;
  inherit (import ./sync-interval.nix { inherit lib; }) syncIntervalType;
  site = cfg.site;
  domain = "leaf-${site}";

  jsonFormat = pkgs.formats.json { };
  tomlFormat = pkgs.formats.toml { };

  hasRemote = cfg.hub.urls != [ ];
  hasSeed = cfg.hub.nkeySeedFile != null;
  # The server reads a config assembled at start whenever something in it
  # cannot live in the store as is.
  runtimeConfig = hasSeed || cfg.authorization.enable;
  runtimeDir = "/run/nats-leaf";

  settingsFile = jsonFormat.generate "nats-leaf-settings.json" config.services.nats.settings;

  # The access map as `presenced acl` reads it.
  accessFile = tomlFormat.generate "presenced-access-${site}.toml" cfg.authorization.access;

  # Where the authorization block is produced: `presenced acl` turns the
  # ownership map (public keys and the services they belong to) into NKEY
  # users with allow lists, deny by default. Nothing here is secret.
  # A pre-rendered file replaces the step when the build machine has no
  # presenced to run (services.presenced.buildPackage = null).
  authorizationFile =
    if cfg.authorization.file != null then
      cfg.authorization.file
    else
      pkgs.runCommand "nats-leaf-${site}-authorization.conf"
        { nativeBuildInputs = [ config.services.presenced.buildPackage ]; }
        ''
          presenced acl --access ${accessFile} --site ${site} > "$out"
        '';

  topFile = pkgs.writeText "nats-leaf-${site}.conf" (
    ''
      include "./settings.json"
    ''
    + optionalString cfg.authorization.enable ''
      include "./authorization.conf"
    ''
  );

  # The assembled config checked with `nats-server -t` at build time, with
  # everything but the seed in place.
  checkedTopFile =
    pkgs.runCommand "nats-leaf-${site}-checked.conf"
      { nativeBuildInputs = [ pkgs.buildPackages.nats-server ]; }
      ''
        mkdir conf
        cp ${settingsFile} conf/settings.json
        ${optionalString cfg.authorization.enable "cp ${authorizationFile} conf/authorization.conf"}
        cp ${topFile} conf/nats.conf
        nats-server -c conf/nats.conf -t
        ln -s ${topFile} "$out"
      '';

  assemble = pkgs.writeShellScript "nats-leaf-assemble-config" ''
    set -eu
    umask 0077
    ${
      if hasSeed then
        ''
          ${pkgs.jq}/bin/jq --rawfile seed "$CREDENTIALS_DIRECTORY/leaf-nkey-seed" \
            '.leafnodes.remotes[0].nkey = ($seed | gsub("\\s+$"; ""))' \
            ${settingsFile} > ${runtimeDir}/settings.json
        ''
      else
        ''
          ${pkgs.coreutils}/bin/cp ${settingsFile} ${runtimeDir}/settings.json
        ''
    }
    ${optionalString cfg.authorization.enable ''
      ${pkgs.coreutils}/bin/cp ${authorizationFile} ${runtimeDir}/authorization.conf
    ''}
    ${pkgs.coreutils}/bin/cp ${checkedTopFile} ${runtimeDir}/nats.conf
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
          {option}`access` at build time. For builds whose machine cannot
          run presenced ({option}`services.presenced.buildPackage` is
          null). Public keys only: it lands in the store.
        '';
      };
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = !hasSeed || !(lib.hasPrefix "${builtins.storeDir}/" (toString cfg.hub.nkeySeedFile));
        message = ''
          services.presenced.leaf.hub.nkeySeedFile is in the Nix store, which
          every local user can read; keep the seed outside the store.
        '';
      }
      {
        assertion =
          !cfg.authorization.enable
          || cfg.authorization.file != null
          || config.services.presenced.buildPackage != null;
        message = ''
          services.presenced.leaf.authorization is enabled, but there is no
          presenced to render it at build time (services.presenced.buildPackage
          is null): set buildPackage to the build machine's presenced, or
          give the rendered block as services.presenced.leaf.authorization.file.
        '';
      }
      {
        assertion = !hasSeed || hasRemote;
        message = "services.presenced.leaf.hub.nkeySeedFile is set but hub.urls is empty.";
      }
    ];

    services.nats = {
      enable = true;
      # Explicit: nixpkgs renders `"jetstream": {}` even when this is off,
      # and an empty block turns JetStream on with default limits.
      jetstream = true;
      serverName = mkDefault domain;
      port = cfg.port;
      settings = {
        host = cfg.host;
        http = "127.0.0.1:${toString cfg.monitorPort}";
        jetstream = {
          inherit domain;
        }
        // optionalAttrs (cfg.jetstream.maxMemory != null) { max_mem = cfg.jetstream.maxMemory; }
        // optionalAttrs (cfg.jetstream.maxFile != null) { max_file = cfg.jetstream.maxFile; }
        // optionalAttrs (cfg.jetstream.syncInterval != null) {
          sync_interval = cfg.jetstream.syncInterval;
        };
      }
      // optionalAttrs hasRemote {
        leafnodes.remotes = [ { inherit (cfg.hub) urls; } ];
      };
    };

    systemd.services.nats.serviceConfig = mkIf runtimeConfig {
      RuntimeDirectory = [ "nats-leaf" ];
      RuntimeDirectoryMode = "0700";
      LoadCredential = lib.optional hasSeed "leaf-nkey-seed:${toString cfg.hub.nkeySeedFile}";
      ExecStartPre = [ assemble ];
      ExecStart = mkForce "${pkgs.nats-server}/bin/nats-server -c ${runtimeDir}/nats.conf";
    };

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
