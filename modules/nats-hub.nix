# services.presenced.hub: one node of the 3-node JetStream hub cluster
# (domain `hub`) that the sites' leaf nodes link to and that mirrors every
# site. Built on nixpkgs' services.nats (unit, user, sandbox); the server's
# config is rendered at build time by `presenced nats-config hub`, the one
# writer of nats-server configs. The same file configures every node, only
# the node name differs.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    literalExpression
    mkEnableOption
    mkIf
    mkOption
    optionalAttrs
    optionalString
    types
    ;

  cfg = config.services.presenced.hub;
  inherit (import ./sync-interval.nix { inherit lib; }) syncIntervalType;
  prov = cfg.provision;

  # The client address this node's own tools dial.
  localHost = if cfg.host == "0.0.0.0" then "127.0.0.1" else cfg.host;
  seedCredential = "hub-admin-nkey-seed";

  provisionArgs = [
    "provision-hub"
    "--server"
    (lib.concatStringsSep "," prov.servers)
    "--replicas"
    (toString prov.replicas)
  ]
  ++ lib.concatMap (site: [
    "--site"
    site
  ]) prov.sites
  # `%d` is systemd's credentials directory of the unit.
  ++ lib.optionals (prov.nkeySeedFile != null) [
    "--nkey-seed-file"
    "%d/${seedCredential}"
  ];

  peers = lib.filterAttrs (name: _: name != cfg.nodeName) cfg.nodes;
  routes = lib.mapAttrsToList (
    _: address: "nats-route://${address}:${toString cfg.clusterPort}"
  ) peers;

  # Leaves authenticate with their NKEY; with no key declared the hub
  # accepts any leaf (a lab setup). With keys, the users and their
  # permissions come from `presenced acl-hub`: each site's leafnode identity
  # may connect as a leafnode only and reach only its own site's JetStream;
  # the admin gets the hub's and the sites' APIs. Public keys only: it lives
  # in the store.
  authorization = cfg.leafNkeys != { };
  presenced = config.services.presenced.buildPackage;
  tomlFormat = pkgs.formats.toml { };
  siteAccess = lib.mapAttrsToList (
    site: nkey:
    "${site}=${tomlFormat.generate "presenced-hub-${site}-access.toml" { leafnode.nkey = nkey; }}"
  ) cfg.leafNkeys;

  # The node as `presenced nats-config hub` reads it: the one renderer of
  # nats-server configs (the sandbox and the tests use it too).
  description = {
    server_name = cfg.nodeName;
    listen = "${cfg.host}:${toString cfg.port}";
    monitor_port = cfg.monitorPort;
    jetstream = {
      store_dir = config.services.nats.dataDir;
      sync_interval =
        if cfg.jetstream.syncInterval == null then "server-default" else cfg.jetstream.syncInterval;
    }
    // optionalAttrs (cfg.jetstream.maxMemory != null) { max_memory = cfg.jetstream.maxMemory; }
    // optionalAttrs (cfg.jetstream.maxFile != null) { max_file = cfg.jetstream.maxFile; };
    cluster = {
      name = cfg.clusterName;
      listen = "0.0.0.0:${toString cfg.clusterPort}";
      inherit routes;
    };
    leafnodes.listen = "0.0.0.0:${toString cfg.leafPort}";
  }
  // optionalAttrs authorization { authorization_include = "authorization.conf"; };

  # `presenced acl-hub`, or the pre-rendered block.
  authorizationFile =
    if cfg.authorizationFile != null then
      cfg.authorizationFile
    else
      pkgs.runCommand "nats-hub-authorization.conf" { nativeBuildInputs = [ presenced ]; } ''
        presenced acl-hub ${
          lib.escapeShellArgs (
            lib.optionals (cfg.adminNkey != null) [
              "--admin-nkey"
              cfg.adminNkey
            ]
            ++ lib.concatMap (key: [
              "--viewer-nkey"
              key
            ]) cfg.viewerNkeys
            ++ siteAccess
          )
        } > "$out"
      '';

  # The server's config as a directory (includes resolve against it),
  # rendered by `presenced nats-config hub` and checked with
  # `nats-server -t` at build time.
  configDir =
    pkgs.runCommand "nats-hub-${cfg.nodeName}-conf"
      {
        nativeBuildInputs = [
          presenced
          pkgs.buildPackages.nats-server
        ];
      }
      ''
        mkdir "$out"
        presenced nats-config hub ${tomlFormat.generate "nats-hub-${cfg.nodeName}.toml" description} > "$out/nats.conf"
        ${optionalString authorization ''cp ${authorizationFile} "$out/authorization.conf"''}
        nats-server -c "$out/nats.conf" -t
      '';
in
{
  imports = [ ./common.nix ];

  options.services.presenced.hub = {
    enable = mkEnableOption "a node of presenced's JetStream hub cluster";

    description = mkOption {
      type = types.attrs;
      readOnly = true;
      internal = true;
      description = "The node as handed to `presenced nats-config hub` (TOML).";
    };

    configDir = mkOption {
      type = types.path;
      readOnly = true;
      internal = true;
      description = "The rendered and checked config directory of the server.";
    };

    nodeName = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = literalExpression "config.networking.hostName";
      description = "This node's name in {option}`nodes`; also its NATS server name.";
    };

    nodes = mkOption {
      type = types.attrsOf types.str;
      example = {
        hub-1 = "192.0.2.11";
        hub-2 = "192.0.2.12";
        hub-3 = "192.0.2.13";
      };
      description = ''
        Every node of the cluster, name to address. Each node routes to all
        others; the hub's streams are replicated three times, so declare
        three nodes (or five).
      '';
    };

    clusterName = mkOption {
      type = types.str;
      default = "presenced-hub";
      description = "Name of the NATS cluster.";
    };

    host = mkOption {
      type = types.str;
      default = "127.0.0.1";
      description = "Address of the client port (admin tools, `presenced provision`).";
    };

    port = mkOption {
      type = types.port;
      default = 4222;
      description = "Client port; not opened in the firewall.";
    };

    clusterPort = mkOption {
      type = types.port;
      default = 6222;
      description = "Route port between hub nodes.";
    };

    leafPort = mkOption {
      type = types.port;
      default = 7422;
      description = "Port the sites' leaf nodes connect to.";
    };

    monitorPort = mkOption {
      type = types.port;
      default = 8222;
      description = "HTTP monitoring port, bound to 127.0.0.1 only.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = true;
      description = "Open the route and leafnode ports; the client and monitoring ports stay closed.";
    };

    leafNkeys = mkOption {
      type = types.attrsOf (types.strMatching "U[A-Z2-7]{55}");
      default = { };
      example = {
        home = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4";
      };
      description = ''
        Public NKEY of each site's leaf, by site. When any key is
        declared, only these and {option}`adminNkey` may connect, each as
        `presenced acl-hub` allows; with none, any leaf may (a lab setup).
      '';
    };

    authorizationFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = ''
        The hub's authorization block, rendered beforehand with
        `presenced acl-hub`, instead of rendering it from
        {option}`leafNkeys` and {option}`adminNkey` at build time. For
        builds whose machine cannot run presenced
        ({option}`services.presenced.buildPackage` is null). Public keys
        only: it lands in the store.
      '';
    };

    adminNkey = mkOption {
      type = types.nullOr (types.strMatching "U[A-Z2-7]{55}");
      default = null;
      description = "Public NKEY of the admin identity that provisions the hub mirrors.";
    };

    viewerNkeys = mkOption {
      type = types.listOf (types.strMatching "U[A-Z2-7]{55}");
      default = [ ];
      description = ''
        Public NKEYs of read-only viewers: `presenced dashboard` run with
        one of their seeds lists every site from its mirrors and can
        create, change or delete nothing on the hub (unlike
        {option}`adminNkey`).
      '';
    };

    provision = {
      enable = mkOption {
        type = types.bool;
        default = prov.sites != [ ];
        defaultText = literalExpression "config.services.presenced.hub.provision.sites != [ ]";
        description = ''
          Run `presenced provision-hub` as the oneshot unit
          `presenced-provision-hub` after nats.service: it creates or
          updates the hub mirrors of every site in {option}`sites`
          (`SENSORS-<site>`, `EVENTS-<site>`, `presence-<site>`,
          `owners-<site>`), idempotently, and is retried until the cluster
          has elected its leaders. Running it on every node is safe; one
          suffices.
        '';
      };

      sites = mkOption {
        type = types.listOf (types.strMatching "[a-z0-9-]{1,32}");
        default = [ ];
        example = [
          "home"
          "office"
        ];
        description = "Sites whose mirrors the hub keeps; each site's leaf links with its own NKEY.";
      };

      servers = mkOption {
        type = types.nonEmptyListOf types.str;
        default = [ "nats://${localHost}:${toString cfg.port}" ];
        defaultText = literalExpression ''[ "nats://127.0.0.1:''${toString config.services.presenced.hub.port}" ]'';
        description = "Client URLs of the hub that `provision-hub` tries, in order.";
      };

      replicas = mkOption {
        type = types.ints.between 1 5;
        default = 3;
        description = "Replicas of each mirror; 3 on the 3-node hub.";
      };

      nkeySeedFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = "/var/lib/secrets/presenced/admin.nk";
        description = ''
          File holding the NKEY seed of the hub's admin identity (its public
          key is {option}`services.presenced.hub.adminNkey`). Loaded with
          `LoadCredential=`; it never enters the store. Required once the
          hub accepts declared identities only.
        '';
      };
    };

    jetstream = {
      maxMemory = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "Upper bound of JetStream memory storage (`max_mem`).";
      };
      maxFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "500G";
        description = "Upper bound of JetStream file storage (`max_file`).";
      };
      syncInterval = mkOption {
        type = syncIntervalType;
        default = "1s";
        example = "always";
        description = ''
          How often JetStream fsyncs stored writes (`sync_interval`); the
          leaf's default, see {option}`services.presenced.leaf.jetstream.syncInterval`.
          The hub's R3 replicas already survive the loss of one node;
          `null` leaves nats-server's default, 2 minutes.
        '';
      };
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.nodes ? ${cfg.nodeName};
        message = ''
          services.presenced.hub.nodeName is `${cfg.nodeName}`, which is not
          one of services.presenced.hub.nodes (${lib.concatStringsSep ", " (lib.attrNames cfg.nodes)}).
        '';
      }
      {
        assertion =
          prov.nkeySeedFile == null || !(lib.hasPrefix "${builtins.storeDir}/" (toString prov.nkeySeedFile));
        message = ''
          services.presenced.hub.provision.nkeySeedFile is in the Nix store,
          which every local user can read; keep the seed outside the store.
        '';
      }
      {
        assertion = !prov.enable || !authorization || prov.nkeySeedFile != null;
        message = ''
          services.presenced.hub.provision is enabled and the hub accepts
          declared identities only, but provision.nkeySeedFile is not set:
          give the admin seed (public key in adminNkey).
        '';
      }
      {
        assertion = !prov.enable || prov.nkeySeedFile == null || cfg.adminNkey != null;
        message = ''
          services.presenced.hub.provision.nkeySeedFile is set but adminNkey
          is not: the hub would refuse the admin identity.
        '';
      }
      {
        assertion = presenced != null;
        message = ''
          services.presenced.hub: the node's config is rendered at build time
          by `presenced nats-config hub`, but services.presenced.buildPackage
          is null: set it to a presenced the build machine can run (on a
          cross build, the build machine's own).
        '';
      }
      {
        assertion = cfg.adminNkey == null || authorization;
        message = ''
          services.presenced.hub.adminNkey is set but no leafNkeys are: a hub
          that declares identities admits only those, so no site's leaf
          could link. Declare each site's leaf key in leafNkeys.
        '';
      }
      {
        assertion = !prov.enable || prov.sites != [ ];
        message = "services.presenced.hub.provision is enabled but provision.sites is empty.";
      }
    ];

    warnings = lib.optional (lib.length (lib.attrNames cfg.nodes) < 3) ''
      services.presenced.hub.nodes declares fewer than three nodes; the
      hub's replicated (R3) streams need three.
    '';

    services.presenced.hub = { inherit description configDir; };

    # nixpkgs' services.nats brings the unit, its user and state directory
    # and its sandbox; the config it would render from `settings` is not
    # used: the server starts on the one `presenced nats-config` renders.
    services.nats = {
      enable = true;
      # Explicit: nixpkgs renders `"jetstream": {}` even when this is off,
      # and an empty block turns JetStream on with default limits.
      jetstream = true;
      serverName = cfg.nodeName;
      port = cfg.port;
    };

    systemd.services.nats.serviceConfig.ExecStart =
      lib.mkForce "${pkgs.nats-server}/bin/nats-server -c ${configDir}/nats.conf";

    networking.firewall.allowedTCPPorts = lib.optionals cfg.openFirewall [
      cfg.clusterPort
      cfg.leafPort
    ];

    systemd.services.presenced-provision-hub = mkIf prov.enable {
      description = "presenced: create the hub mirrors of the sites";
      wantedBy = [ "multi-user.target" ];
      wants = [
        "network-online.target"
        "nats.service"
      ];
      after = [
        "network-online.target"
        "nats.service"
      ];

      serviceConfig = import ./hardening.nix // {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = lib.escapeShellArgs (
          [ "${config.services.presenced.package}/bin/presenced" ] ++ provisionArgs
        );
        # The other nodes may still be starting, or electing the leaders of
        # the mirrors; try again until the cluster answers.
        Restart = "on-failure";
        RestartSec = "5s";
        LoadCredential = lib.optional (
          prov.nkeySeedFile != null
        ) "${seedCredential}:${toString prov.nkeySeedFile}";
        PrivateDevices = true;
        PrivateUsers = true;
      };
    };

    # `presenced provision-hub` by hand (a new site) and `presenced watch
    # --hub`.
    environment.systemPackages = [
      pkgs.natscli
      config.services.presenced.package
    ];
  };
}
