# services.presenced: the daemon, as one systemd unit per instance, plus the
# provisioning oneshot that creates the leaf's streams and buckets.
#
# One instance is one NATS identity. The simple deployment runs a single
# instance that ingests and decides; the strict one runs ingest, engine and
# archiver as separate instances (or in separate nixos-containers), each with
# its own NKEY, so the server can hold each to its own keyspace.
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
    mkIf
    mkMerge
    mkOption
    types
    ;

  cfg = config.services.presenced;
  settingsFormat = pkgs.formats.toml { };

  # systemd hands credentials to the unit in this directory; the daemon
  # expands a leading `$CREDENTIALS_DIRECTORY` in its path fields, so the
  # rendered config (world-readable, in the store) holds only the path.
  credentialPath = name: "$CREDENTIALS_DIRECTORY/${name}";

  inStore = path: lib.hasPrefix "${builtins.storeDir}/" (toString path);

  # A path given as a Nix path literal would be copied into the store when
  # interpolated; `toString` keeps it where it is.
  secretFileOption =
    description:
    mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/keys/presenced/ingest.nk";
      inherit description;
    };

  # Units of a nats-server on this host that presenced talks to; in a
  # container the leaf runs on the host and there is nothing to order after.
  natsUnits = lib.optional (config.services.nats.enable or false) "nats.service";
  provisionUnits = lib.optional cfg.provision.enable "presenced-provision.service";

  enabledInstances = lib.filterAttrs (_: instance: instance.enable) cfg.instances;

  # Where each instance serves /healthz and /metrics (the daemon's default
  # when unset); two on one host at the same address would fail at start.
  httpListen = lib.mapAttrs (_: instance: instance.settings.http.listen or "127.0.0.1:9464") (
    lib.filterAttrs (_: instance: instance.settings.http.enabled or true) enabledInstances
  );
  sharedListen = lib.filterAttrs (_: names: lib.length names > 1) (
    lib.groupBy (name: httpListen.${name}) (lib.attrNames httpListen)
  );

  # Credentials of an instance or of the provisioner, by credential name.
  credentialsOf =
    unit:
    lib.filterAttrs (_: file: file != null) (
      {
        nkey-seed = unit.nkeySeedFile;
      }
      // lib.optionalAttrs (unit ? s3) {
        s3-access-key-id = unit.s3.accessKeyIdFile;
        s3-secret-access-key = unit.s3.secretAccessKeyFile;
      }
      // (unit.credentialFiles or { })
    );

  loadCredential =
    unit: lib.mapAttrsToList (name: file: "${name}:${toString file}") (credentialsOf unit);

  secretAssertions =
    what: unit:
    lib.mapAttrsToList (name: file: {
      assertion = !(inStore file);
      message = ''
        ${what}: credential `${name}` is read from ${toString file}, a path in
        the Nix store, which every local user can read. Keep secrets outside
        the store (e.g. /run/keys or /var/lib/secrets) and give that path.
      '';
    }) (credentialsOf unit);

  # Renders the settings and, unless disabled, runs `presenced check-config`
  # on them, so a bad config fails `nixos-rebuild` instead of the unit.
  # The check runs cfg.buildPackage, the presenced the build machine can
  # run (common.nix).
  renderConfig =
    name: check: settings:
    let
      raw = settingsFormat.generate "presenced-${name}.toml" settings;
    in
    if check then
      pkgs.runCommand "presenced-${name}-checked.toml" { nativeBuildInputs = [ cfg.buildPackage ]; } ''
        presenced check-config ${raw}
        ln -s ${raw} "$out"
      ''
    else
      raw;

  # Shared sandbox of the daemons and the provisioners.
  hardening = import ./hardening.nix;

  settingsOption =
    description:
    mkOption {
      type = types.submodule {
        freeformType = settingsFormat.type;
        options.site = mkOption {
          type = types.strMatching "[a-z0-9-]{1,32}";
          description = "The edge host's id; defaults to {option}`services.presenced.site`.";
        };
      };
      default = { };
      inherit description;
    };

  # The settings a standby takes from its primary on the same host: what
  # the engine needs, not the sources (a second ingest would store every
  # reading twice) nor the HTTP listener.
  standbyCopies = [
    "site"
    "nats"
    "engine"
    "lease"
    "health"
    "log"
    "zones"
    "persons"
  ];

  instanceModule =
    { name, config, ... }:
    let
      # The instance this one stands by for, when declared on this host.
      primary =
        if config.standbyOf != null && config.standbyOf != name && cfg.instances ? ${config.standbyOf} then
          cfg.instances.${config.standbyOf}
        else
          null;
    in
    {
      options = {
        enable = mkEnableOption "this presenced instance" // {
          default = true;
        };

        package = mkOption {
          type = types.package;
          default = cfg.package;
          defaultText = literalExpression "config.services.presenced.package";
          description = "The presenced package this instance runs.";
        };

        settings = settingsOption ''
          The instance's `presenced.toml`, as Nix. Unknown fields are
          rejected by the daemon, and the rendered file is checked with
          `presenced check-config` at build time. Which components run
          follows from the config: MQTT sources make an ingest, zones make
          an engine.

          Everything here is world-readable in the Nix store: secrets go
          by path, through {option}`nkeySeedFile`, {option}`s3` and
          {option}`credentialFiles`, which reach the unit as systemd
          credentials under `$CREDENTIALS_DIRECTORY`.
        '';

        nkeySeedFile = secretFileOption ''
          File holding this instance's NKEY seed (from `presenced keygen`).
          Loaded with `LoadCredential=` as `nkey-seed`;
          `settings.nats.nkey_seed_file` then points at it. Leave unset
          while the leaf runs without authorization.
        '';

        s3 = {
          accessKeyIdFile = secretFileOption ''
            File holding the S3 (Wasabi) access key id of an archiver.
            Loaded as credential `s3-access-key-id`.
          '';
          secretAccessKeyFile = secretFileOption ''
            File holding the S3 (Wasabi) secret access key of an
            archiver. Loaded as credential `s3-secret-access-key`.
          '';
        };

        credentialFiles = mkOption {
          type = types.attrsOf types.path;
          default = { };
          example = literalExpression ''{ mqtt-main-password = "/run/keys/mqtt-main"; }'';
          description = ''
            Further secret files, by credential name. Refer to one in
            {option}`settings` as `$CREDENTIALS_DIRECTORY/<name>`, e.g.
            `mqtt.main.password_file`.
          '';
        };

        serialDevices = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ "/dev/serial/by-id/usb-1a86_USB_Serial-if00-port0" ];
          description = ''
            Serial ports this instance reads (mmWave radars, JSON-line
            devices). When any is listed, the unit may open every device of
            {option}`serialDeviceClasses` and joins the `dialout` group;
            `PrivateDevices=` and `PrivateUsers=` are turned off for such an
            instance, as they would hide the ports.
          '';
        };

        serialDeviceClasses = mkOption {
          type = types.listOf (types.strMatching "[a-zA-Z0-9_/-]+");
          default = [
            "ttyUSB"
            "ttyACM"
          ];
          example = [ "ttyS" ];
          description = ''
            Kernel device classes (names in `/proc/devices`) the unit may
            open when {option}`serialDevices` is not empty, as
            `DeviceAllow=char-<class> rw`. A class covers every device of
            its major number, so a port plugged in after the unit started,
            or replugged as another `ttyUSBn`, is still allowed; a path in
            `DeviceAllow=` is resolved once, when the unit starts, and would
            deny both. USB serial adapters are `ttyUSB` (FTDI, CH340,
            CP210x) or `ttyACM` (CDC ACM); on-board UARTs are `ttyS` or
            `ttyAMA`.
          '';
        };

        watchdogSec = mkOption {
          type = types.str;
          default = "30s";
          description = ''
            `WatchdogSec=` of the unit: systemd restarts the daemon when its
            main loop stops sending `WATCHDOG=1` for this long.
          '';
        };

        page = {
          listen = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "192.168.1.10:9464";
            description = ''
              Where this instance serves its status page, as
              `settings.http.listen`: one listener serves the page,
              `/healthz` and `/metrics`. Null keeps the setting (loopback,
              `127.0.0.1:9464`, by default). See docs/OPERATIONS.md,
              "Status page".
            '';
          };
          openFirewallOn = mkOption {
            type = types.listOf types.str;
            default = [ ];
            example = [ "eth0" ];
            description = ''
              Interfaces on which the port of {option}`page.listen` is
              opened in the firewall. Nothing is opened on other
              interfaces.
            '';
          };
          commands = mkOption {
            type = types.bool;
            default = false;
            description = ''
              Let the page send overrides (`settings.http.page_commands`).
              The form also needs this instance's identity to be granted
              `commands` in the ownership map; the page has no login of its
              own, so keep this off on a listener people who should not
              hold zones can reach.
            '';
          };
        };

        standbyOf = mkOption {
          type = types.nullOr (types.strMatching "[a-z0-9_-]{1,64}");
          default = null;
          example = "engine";
          description = ''
            Run this instance as a standby of the engine of service
            `<name>` (docs/OPERATIONS.md, "Engine failover"):
            {option}`settings.service` becomes that name, so both share the
            service's identity and its leader lease `owners.<name>`; the
            instance holding the lease runs the engine, the other follows
            its state and takes over within the lease's TTL plus about a
            second when it dies, freezes or loses the leaf. By default only
            the engine runs here (`runs = [ "engine" ]`); while this
            instance holds the lease, the instances that run ingest read
            the sources. Give it `runs` and the sources of the named
            instance to stand by for its ingest too: only the lease holder
            then reads (docs/OPERATIONS.md, "Two instances of one ingest
            service").

            When an instance of that name is declared on this host, its
            `site`, `nats`, `engine`, `lease`, `health`, `log`, `zones` and
            `persons` settings and its {option}`nkeySeedFile` are this
            instance's defaults; give the standby its own
            {option}`page.listen`. On another host or container, give the
            same settings and seed by hand.
          '';
        };

        checkConfig = mkOption {
          type = types.bool;
          default = cfg.buildPackage != null;
          defaultText = literalExpression "config.services.presenced.buildPackage != null";
          description = ''
            Run `presenced check-config` (of
            {option}`services.presenced.buildPackage`) on the rendered file
            at build time.
          '';
        };

        configFile = mkOption {
          type = types.path;
          readOnly = true;
          description = "The rendered (and checked) config file of this instance.";
        };
      };

      config = {
        nkeySeedFile = mkIf (primary != null) (mkDefault primary.nkeySeedFile);
        settings = mkMerge [
          { site = mkIf (cfg.site != null) (mkDefault cfg.site); }
          # The instance's name is its identity in the ownership map.
          { service = mkDefault name; }
          (mkIf (config.standbyOf != null) {
            service = config.standbyOf;
            runs = mkDefault [ "engine" ];
          })
          # Above this instance's own defaults, below what it sets.
          (mkIf (primary != null) (
            lib.mapAttrsRecursive (_: lib.mkOverride 900) (
              lib.getAttrs (lib.filter (k: primary.settings ? ${k}) standbyCopies) primary.settings
            )
          ))
          { nats.url = mkDefault "nats://127.0.0.1:4222"; }
          (mkIf (config.nkeySeedFile != null) { nats.nkey_seed_file = credentialPath "nkey-seed"; })
          (mkIf (config.page.listen != null) { http.listen = config.page.listen; })
          (mkIf config.page.commands { http.page_commands = true; })
          (mkIf (config.s3.accessKeyIdFile != null) {
            archive.s3.access_key_file = mkDefault (credentialPath "s3-access-key-id");
          })
          (mkIf (config.s3.secretAccessKeyFile != null) {
            archive.s3.secret_key_file = mkDefault (credentialPath "s3-secret-access-key");
          })
        ];
        configFile = renderConfig name config.checkConfig config.settings;
      };
    };

  instanceUnit =
    name: instance:
    let
      serial = instance.serialDevices != [ ];
    in
    {
      description = "presenced presence detection (${name})";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ] ++ natsUnits ++ provisionUnits;
      after = [ "network-online.target" ] ++ natsUnits ++ provisionUnits;

      serviceConfig = hardening // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${instance.package}/bin/presenced run --config ${instance.configFile}";
        WatchdogSec = instance.watchdogSec;
        Restart = "on-failure";
        RestartSec = "2s";
        # The daemon drains for up to engine.drain_timeout (10 s by default)
        # after SIGTERM before it exits.
        TimeoutStopSec = "30s";

        StateDirectory = "presenced/${name}";
        StateDirectoryMode = "0700";
        WorkingDirectory = "/var/lib/presenced/${name}";
        LoadCredential = loadCredential instance;

        DeviceAllow = lib.optionals serial (map (class: "char-${class} rw") instance.serialDeviceClasses);
        SupplementaryGroups = lib.optional serial "dialout";
        PrivateDevices = !serial;
        PrivateUsers = !serial;
      };
    };
in
{
  imports = [ ./common.nix ];

  options.services.presenced = {
    instances = mkOption {
      type = types.attrsOf (types.submodule instanceModule);
      default = { };
      example = literalExpression ''
        {
          main.settings = {
            mqtt.z2m.zigbee2mqtt.devices = [
              { device = "hall_pir"; kind = "occupancy"; }
            ];
            zones.hall.evidence = [
              { sensor = "hall_pir"; p_true = 0.9; p_false = 0.05; hold = "2m"; }
            ];
          };
        }
      '';
      description = ''
        presenced instances, each run as unit `presenced-<name>` with its
        own dynamic user and, when the leaf enforces authorization, its own
        NKEY.
      '';
    };

    provision = {
      enable = mkOption {
        type = types.bool;
        default = enabledInstances != { } && (config.services.nats.enable or false);
        defaultText = literalExpression "instances are enabled and a nats-server runs on this host";
        description = ''
          Run `presenced provision` as the oneshot unit
          `presenced-provision` before the daemons: it creates or updates
          the leaf's streams and buckets, idempotently. The daemons never
          create them themselves. Run it on the host of the leaf.
        '';
      };

      settings = settingsOption ''
        Config of the provisioner: the site, the leaf's URL and, in a strict
        deployment, the admin identity (see {option}`nkeySeedFile`).
      '';

      nkeySeedFile = secretFileOption ''
        File holding the NKEY seed of the admin identity that may create
        streams and buckets. Loaded as credential `nkey-seed`.
      '';

      accessFile = mkOption {
        type = types.nullOr types.path;
        default =
          if config.services.presenced.leaf.authorization.enable or false then
            settingsFormat.generate "presenced-access.toml" config.services.presenced.leaf.authorization.access
          else
            null;
        defaultText = literalExpression "the leaf's authorization.access, when the leaf enforces authorization";
        description = ''
          The ownership map handed to `presenced provision --access`: it
          stores what each service runs and who may send commands, which
          clients' stale flags and the engine's command replies go by.
          Public keys only. The provisioner runs as the admin identity
          ({option}`nkeySeedFile`); a service identity may not provision.
        '';
      };

      checkConfig = mkOption {
        type = types.bool;
        default = cfg.buildPackage != null;
        defaultText = literalExpression "config.services.presenced.buildPackage != null";
        description = "Run `presenced check-config` on the provisioner's config at build time.";
      };

      configFile = mkOption {
        type = types.path;
        readOnly = true;
        description = "The rendered config file of the provisioner.";
      };
    };
  };

  config = mkMerge [
    {
      services.presenced.provision = {
        settings = mkMerge [
          { site = mkIf (cfg.site != null) (mkDefault cfg.site); }
          { nats.url = mkDefault "nats://127.0.0.1:4222"; }
          (mkIf (cfg.provision.nkeySeedFile != null) {
            nats.nkey_seed_file = credentialPath "nkey-seed";
          })
        ];
        configFile = renderConfig "provision" cfg.provision.checkConfig cfg.provision.settings;
      };
    }

    (mkIf (enabledInstances != { }) {
      assertions =
        lib.concatLists (
          lib.mapAttrsToList (
            name: instance:
            [
              {
                assertion = builtins.match "[a-z0-9][a-z0-9_-]*" name != null && name != "provision";
                message = ''
                  services.presenced.instances.${name}: the name becomes unit
                  presenced-${name}; use [a-z0-9_-], starting with a letter or
                  digit, and not `provision`.
                '';
              }
            ]
            ++ [
              {
                assertion = !instance.checkConfig || cfg.buildPackage != null;
                message = ''
                  services.presenced.instances.${name}.checkConfig is on but
                  services.presenced.buildPackage is null: give the build
                  machine's presenced, or turn the check off.
                '';
              }
            ]
            ++ [
              {
                assertion = instance.standbyOf != name;
                message = ''
                  services.presenced.instances.${name}.standbyOf names the
                  instance itself: name the instance (service) whose engine
                  it stands by for.
                '';
              }
            ]
            ++ [
              {
                assertion = instance.page.openFirewallOn == [ ] || instance.page.listen != null;
                message = ''
                  services.presenced.instances.${name}.page.openFirewallOn
                  opens the page's port, but page.listen is not set: the page
                  listens on loopback; give page.listen an address on that
                  network.
                '';
              }
            ]
            ++ secretAssertions "services.presenced.instances.${name}" instance
          ) enabledInstances
        )
        ++ lib.mapAttrsToList (listen: names: {
          assertion = false;
          message = ''
            services.presenced.instances: ${lib.concatStringsSep ", " names} all serve
            /healthz and /metrics on ${listen}; give each its own
            settings.http.listen (e.g. 127.0.0.1:9465), or set
            settings.http.enabled = false.
          '';
        }) sharedListen;

      systemd.services = lib.mapAttrs' (
        name: instance: lib.nameValuePair "presenced-${name}" (instanceUnit name instance)
      ) enabledInstances;

      # The status page's port, on the interfaces each instance names.
      networking.firewall.interfaces = mkMerge (
        lib.mapAttrsToList (
          _: instance:
          lib.genAttrs instance.page.openFirewallOn (_: {
            allowedTCPPorts = lib.optional (instance.page.listen != null) (
              lib.toInt (lib.last (lib.splitString ":" instance.page.listen))
            );
          })
        ) enabledInstances
      );

      # The command for `presenced watch`/`get`/`status`/`snapshots` by
      # hand, with the configs at a known place.
      environment.systemPackages = [ cfg.package ];
      environment.etc = lib.mapAttrs' (
        name: instance: lib.nameValuePair "presenced/${name}.toml" { source = instance.configFile; }
      ) enabledInstances;
    })

    (mkIf cfg.provision.enable {
      assertions = secretAssertions "services.presenced.provision" cfg.provision;

      systemd.services.presenced-provision = {
        description = "presenced: create the leaf's streams and buckets";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ] ++ natsUnits;
        after = [ "network-online.target" ] ++ natsUnits;

        serviceConfig = hardening // {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart =
            "${cfg.package}/bin/presenced provision --config ${cfg.provision.configFile}"
            + lib.optionalString (cfg.provision.accessFile != null) " --access ${cfg.provision.accessFile}";
          # The leaf may still be starting; try again rather than leave the
          # daemons without their streams.
          Restart = "on-failure";
          RestartSec = "5s";
          LoadCredential = loadCredential cfg.provision;
          PrivateDevices = true;
          PrivateUsers = true;
        };
      };
    })
  ];
}
