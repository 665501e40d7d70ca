# Module logic of services.presenced that needs no VM: rendered settings,
# unit options, credentials and assertions.
{ lib }:

let
  stubs = import ./stubs.nix { inherit lib; };
  module = ../../../modules/presenced.nix;

  eval =
    presenced:
    stubs.eval [
      module
      { services.presenced = presenced; }
    ];

  simple = eval {
    site = "home";
    instances.main.settings.zones.hall.evidence = [
      {
        sensor = "hall_pir";
        p_true = 0.9;
        p_false = 0.05;
      }
    ];
  };
  unit = simple.systemd.services.presenced-main;
  sc = unit.serviceConfig;

  withSecrets = eval {
    site = "home";
    instances.ingest = {
      nkeySeedFile = "/run/keys/ingest.nk";
      s3.secretAccessKeyFile = "/run/keys/s3-secret";
      credentialFiles.mqtt-main-password = "/run/keys/mqtt";
      settings.mqtt.main.password_file = "$CREDENTIALS_DIRECTORY/mqtt-main-password";
    };
  };

  serial = eval {
    site = "home";
    instances.ingest.serialDevices = [ "/dev/ttyUSB0" ];
  };

  # An on-board UART instead of a USB adapter.
  uart = eval {
    site = "home";
    instances.ingest = {
      serialDevices = [ "/dev/ttyAMA0" ];
      serialDeviceClasses = [ "ttyAMA" ];
    };
  };

  # Building for a platform the build machine cannot run (cross): no
  # presenced at build time.
  noBuildPackage = eval {
    site = "home";
    buildPackage = null;
    instances.main.settings.zones.hall.evidence = [ ];
  };
  forcedCheckWithoutBuildPackage = eval {
    site = "home";
    buildPackage = null;
    instances.main.checkConfig = true;
  };

  seedInStore = eval {
    site = "home";
    instances.ingest.nkeySeedFile = "${builtins.storeDir}/abc-seed/ingest.nk";
  };

  twoOnDefaultPort = eval {
    site = "home";
    instances.ingest = { };
    instances.engine = { };
  };

  twoOnOwnPorts = eval {
    site = "home";
    instances.ingest = { };
    instances.engine.settings.http.listen = "127.0.0.1:9465";
    instances.archiver.settings.http.enabled = false;
  };

  # An engine and its standby on one host.
  withStandby = eval {
    site = "home";
    instances.engine = {
      nkeySeedFile = "/run/keys/engine.nk";
      settings = {
        nats.url = "nats://10.0.0.1:4222";
        lease.ttl = "3s";
        mqtt.z2m.zigbee2mqtt.devices = [
          {
            device = "hall_pir";
            kind = "occupancy";
          }
        ];
        zones.hall.evidence = [
          {
            sensor = "hall_pir";
            p_true = 0.9;
            p_false = 0.05;
          }
        ];
      };
    };
    instances.engine-standby = {
      standbyOf = "engine";
      page.listen = "127.0.0.1:9465";
    };
  };
  standby = withStandby.services.presenced.instances.engine-standby;

  standbyOfItself = eval {
    site = "home";
    instances.engine.standbyOf = "engine";
  };

  badName = eval {
    site = "home";
    instances."Bad.Name" = { };
  };

  withLeaf = stubs.eval [
    module
    {
      services.nats.enable = true;
      services.presenced = {
        site = "home";
        instances.main = { };
        provision.nkeySeedFile = "/run/keys/admin.nk";
      };
    }
  ];

  # The status page on the LAN, its port opened on one interface.
  pageOnLan = eval {
    site = "home";
    instances.main.page = {
      listen = "192.168.1.10:9464";
      openFirewallOn = [ "eth0" ];
      commands = true;
    };
  };

  pageFirewallWithoutListen = eval {
    site = "home";
    instances.main.page.openFirewallOn = [ "eth0" ];
  };

  inContainer = eval {
    site = "home";
    instances.engine.settings.nats.url = "nats://10.231.1.1:4222";
  };
in
{
  testSiteDefaultsFromTopLevel = {
    expr = simple.services.presenced.instances.main.settings.site;
    expected = "home";
  };

  testServiceDefaultsToInstanceName = {
    expr = simple.services.presenced.instances.main.settings.service;
    expected = "main";
  };

  testS3KeyFileIsTheCredential = {
    expr = withSecrets.services.presenced.instances.ingest.settings.archive.s3.secret_key_file;
    expected = "$CREDENTIALS_DIRECTORY/s3-secret-access-key";
  };

  testNatsUrlDefaultsToLoopback = {
    expr = simple.services.presenced.instances.main.settings.nats.url;
    expected = "nats://127.0.0.1:4222";
  };

  testNatsUrlOverridable = {
    expr = inContainer.services.presenced.instances.engine.settings.nats.url;
    expected = "nats://10.231.1.1:4222";
  };

  testFreeformSettingsKept = {
    expr = (lib.head simple.services.presenced.instances.main.settings.zones.hall.evidence).sensor;
    expected = "hall_pir";
  };

  testNoSeedNoSeedField = {
    expr = simple.services.presenced.instances.main.settings.nats ? nkey_seed_file;
    expected = false;
  };

  testConfigIsChecked = {
    expr = sc.ExecStart;
    expected = "${stubs.pkgs.presenced}/bin/presenced run --config ${stubs.fakeFile "presenced-main-checked.toml"}";
  };

  testConfigCheckCanBeTurnedOff = {
    expr =
      (eval {
        site = "home";
        instances.main.checkConfig = false;
      }).services.presenced.instances.main.configFile;
    expected = stubs.fakeFile "presenced-main.toml";
  };

  testNotifyWithWatchdog = {
    expr = {
      inherit (sc)
        Type
        NotifyAccess
        WatchdogSec
        Restart
        DynamicUser
        StateDirectory
        ;
    };
    expected = {
      Type = "notify";
      NotifyAccess = "main";
      WatchdogSec = "30s";
      Restart = "on-failure";
      DynamicUser = true;
      StateDirectory = "presenced/main";
    };
  };

  testHardening = {
    expr = {
      inherit (sc)
        ProtectSystem
        NoNewPrivileges
        PrivateDevices
        PrivateUsers
        CapabilityBoundingSet
        ;
      unixForSdNotify = lib.elem "AF_UNIX" sc.RestrictAddressFamilies;
      systemService = lib.elem "@system-service" sc.SystemCallFilter;
    };
    expected = {
      ProtectSystem = "strict";
      NoNewPrivileges = true;
      PrivateDevices = true;
      PrivateUsers = true;
      CapabilityBoundingSet = "";
      unixForSdNotify = true;
      systemService = true;
    };
  };

  testNoCredentialsByDefault = {
    expr = sc.LoadCredential;
    expected = [ ];
  };

  testSecretsAsCredentials = {
    expr = lib.sort lib.lessThan withSecrets.systemd.services.presenced-ingest.serviceConfig.LoadCredential;
    expected = [
      "mqtt-main-password:/run/keys/mqtt"
      "nkey-seed:/run/keys/ingest.nk"
      "s3-secret-access-key:/run/keys/s3-secret"
    ];
  };

  testSeedFieldPointsAtCredential = {
    expr = withSecrets.services.presenced.instances.ingest.settings.nats.nkey_seed_file;
    expected = "$CREDENTIALS_DIRECTORY/nkey-seed";
  };

  testSecretsOutsideStorePass = {
    expr = stubs.failedAssertions withSecrets;
    expected = [ ];
  };

  testSeedInStoreRefused = {
    expr = map (m: lib.hasInfix "credential `nkey-seed`" m) (stubs.failedAssertions seedInStore);
    expected = [ true ];
  };

  testPageListenAndCommandsRendered = {
    expr = {
      inherit (pageOnLan.services.presenced.instances.main.settings.http) listen page_commands;
    };
    expected = {
      listen = "192.168.1.10:9464";
      page_commands = true;
    };
  };

  testPagePortOpenedOnItsInterfaceOnly = {
    expr = {
      inherit (pageOnLan.networking.firewall) allowedTCPPorts;
      eth0 = pageOnLan.networking.firewall.interfaces.eth0.allowedTCPPorts;
    };
    expected = {
      allowedTCPPorts = [ ];
      eth0 = [ 9464 ];
    };
  };

  testPageClosedByDefault = {
    expr = {
      interfaces = simple.networking.firewall.interfaces;
      http = simple.services.presenced.instances.main.settings ? http;
    };
    expected = {
      interfaces = { };
      http = false;
    };
  };

  testPageFirewallNeedsAListenAddress = {
    expr = map (lib.hasInfix "page.openFirewallOn") (stubs.failedAssertions pageFirewallWithoutListen);
    expected = [ true ];
  };

  testBadInstanceNameRefused = {
    expr = map (m: lib.hasInfix "Bad.Name" m) (stubs.failedAssertions badName);
    expected = [ true ];
  };

  testSerialDevicesAllowed = {
    expr = {
      inherit (serial.systemd.services.presenced-ingest.serviceConfig)
        DeviceAllow
        SupplementaryGroups
        PrivateDevices
        PrivateUsers
        DevicePolicy
        ;
    };
    expected = {
      # By class, so a late plug or a replug as another node is allowed.
      DeviceAllow = [
        "char-ttyUSB rw"
        "char-ttyACM rw"
      ];
      SupplementaryGroups = [ "dialout" ];
      PrivateDevices = false;
      PrivateUsers = false;
      DevicePolicy = "closed";
    };
  };

  testSerialDeviceClassesConfigurable = {
    expr = uart.systemd.services.presenced-ingest.serviceConfig.DeviceAllow;
    expected = [ "char-ttyAMA rw" ];
  };

  testNoDevicesWithoutSerial = {
    expr = {
      inherit (sc) DeviceAllow PrivateDevices DevicePolicy;
    };
    expected = {
      DeviceAllow = [ ];
      PrivateDevices = true;
      DevicePolicy = "closed";
    };
  };

  testNoBuildPackageSkipsCheck = {
    expr = {
      check = noBuildPackage.services.presenced.instances.main.checkConfig;
      file = noBuildPackage.services.presenced.instances.main.configFile;
      failed = stubs.failedAssertions noBuildPackage;
    };
    expected = {
      check = false;
      file = stubs.fakeFile "presenced-main.toml";
      failed = [ ];
    };
  };

  testCheckWithoutBuildPackageRefused = {
    expr = lib.length (stubs.failedAssertions forcedCheckWithoutBuildPackage);
    expected = 1;
  };

  testNoProvisionWithoutLocalLeaf = {
    expr = simple.systemd.services ? presenced-provision;
    expected = false;
  };

  testOrderedAfterLeafAndProvision = {
    expr = withLeaf.systemd.services.presenced-main.after;
    expected = [
      "network-online.target"
      "nats.service"
      "presenced-provision.service"
    ];
  };

  testProvisionRunsAsAdmin = {
    expr =
      let
        p = withLeaf.systemd.services.presenced-provision;
      in
      {
        inherit (p.serviceConfig)
          Type
          RemainAfterExit
          LoadCredential
          ExecStart
          ;
        after = p.after;
        seed = withLeaf.services.presenced.provision.settings.nats.nkey_seed_file;
      };
    expected = {
      Type = "oneshot";
      RemainAfterExit = true;
      LoadCredential = [ "nkey-seed:/run/keys/admin.nk" ];
      ExecStart = "${stubs.pkgs.presenced}/bin/presenced provision --config ${stubs.fakeFile "presenced-provision-checked.toml"}";
      after = [
        "network-online.target"
        "nats.service"
      ];
      seed = "$CREDENTIALS_DIRECTORY/nkey-seed";
    };
  };

  # With the ownership map, provisioning stores it (`--access`): what the
  # daemon's command replies and the clients' stale flags go by.
  testProvisionStoresTheOwnershipTable = {
    expr =
      (stubs.eval [
        module
        {
          services.nats.enable = true;
          services.presenced = {
            site = "home";
            instances.main = { };
            provision.nkeySeedFile = "/run/keys/admin.nk";
            provision.accessFile = "/etc/presenced/access.toml";
          };
        }
      ]).systemd.services.presenced-provision.serviceConfig.ExecStart;
    expected = "${stubs.pkgs.presenced}/bin/presenced provision --config ${stubs.fakeFile "presenced-provision-checked.toml"} --access /etc/presenced/access.toml";
  };

  testDisabledInstanceHasNoUnit = {
    expr =
      (eval {
        site = "home";
        instances.main.enable = false;
      }).systemd.services
        ? presenced-main;
    expected = false;
  };

  testSharedHttpListenRefused = {
    expr = map (lib.hasInfix "engine, ingest all serve") (stubs.failedAssertions twoOnDefaultPort);
    expected = [ true ];
  };

  testOwnHttpListenPasses = {
    expr = stubs.failedAssertions twoOnOwnPorts;
    expected = [ ];
  };

  testStandbySharesTheService = {
    expr = {
      inherit (standby.settings) service runs;
      inherit (standby) nkeySeedFile;
    };
    expected = {
      service = "engine";
      runs = [ "engine" ];
      nkeySeedFile = "/run/keys/engine.nk";
    };
  };

  testStandbyTakesTheEngineSettingsNotTheSources = {
    expr = {
      inherit (standby.settings) zones lease;
      url = standby.settings.nats.url;
      seed = standby.settings.nats.nkey_seed_file;
      listen = standby.settings.http.listen;
      mqtt = standby.settings ? mqtt;
    };
    expected = {
      inherit (withStandby.services.presenced.instances.engine.settings) zones lease;
      url = "nats://10.0.0.1:4222";
      seed = "$CREDENTIALS_DIRECTORY/nkey-seed";
      listen = "127.0.0.1:9465";
      mqtt = false;
    };
  };

  testStandbyUnitAndNoAssertion = {
    expr = {
      unit = withStandby.systemd.services ? presenced-engine-standby;
      failed = stubs.failedAssertions withStandby;
    };
    expected = {
      unit = true;
      failed = [ ];
    };
  };

  testStandbyOfItselfRefused = {
    expr = map (lib.hasInfix "instance itself") (stubs.failedAssertions standbyOfItself);
    expected = [ true ];
  };

  testCommandInstalled = {
    expr = simple.environment.systemPackages;
    expected = [ stubs.pkgs.presenced ];
  };

  testConfigLinkedInEtc = {
    expr = simple.environment.etc."presenced/main.toml".source;
    expected = stubs.fakeFile "presenced-main-checked.toml";
  };
}
