# Module logic of services.presenced.leaf that needs no VM: the generated
# nats-server settings, the runtime config for secrets and the firewall.
{ lib }:

let
  stubs = import ./stubs.nix { inherit lib; };
  module = ../../../modules/nats-leaf.nix;

  eval =
    leaf:
    stubs.eval [
      module
      {
        services.presenced.site = "home";
        services.presenced.leaf = leaf;
      }
    ];

  standalone = eval { enable = true; };
  nats = standalone.services.nats;
  # What `presenced nats-config leaf` is given.
  desc = standalone.services.presenced.leaf.description;
  confDir = stubs.fakeFile "nats-leaf-home-conf";

  linked = eval {
    enable = true;
    host = "0.0.0.0";
    openFirewallOn = [ "ve-+" ];
    jetstream.syncInterval = "always";
    hub = {
      urls = [
        "nats-leaf://192.0.2.11:7422"
        "nats-leaf://192.0.2.12:7422"
      ];
      nkeySeedFile = "/var/lib/secrets/leaf.nk";
    };
  };
  linkedUnit = linked.systemd.services.nats.serviceConfig;

  withAcl = eval {
    enable = true;
    authorization = {
      enable = true;
      access.services.ingest.nkey = "UB";
    };
  };

  # Without a presenced for the build machine nothing renders the leaf's
  # config; a pre-rendered authorization block is accepted.
  aclNoBuildPackage = stubs.eval [
    module
    {
      services.presenced.site = "home";
      services.presenced.buildPackage = null;
      services.presenced.leaf = {
        enable = true;
        authorization = {
          enable = true;
          access.services.ingest.nkey = "UB";
        };
      };
    }
  ];
  aclPrerendered = stubs.eval [
    module
    {
      services.presenced.site = "home";
      services.presenced.leaf = {
        enable = true;
        authorization = {
          enable = true;
          file = "/etc/presenced/leaf-authorization.conf";
        };
      };
    }
  ];

  seedInStore = eval {
    enable = true;
    hub = {
      urls = [ "nats-leaf://192.0.2.11:7422" ];
      nkeySeedFile = "${builtins.storeDir}/abc-leaf.nk";
    };
  };

  serverDefaultSync = eval {
    enable = true;
    jetstream.syncInterval = null;
  };

  # The boolean this option replaced still evaluates, with a warning.
  oldSyncAlways = eval {
    enable = true;
    jetstream.syncAlways = true;
  };

  badSync = builtins.tryEval (
    builtins.deepSeq
      (eval {
        enable = true;
        jetstream.syncInterval = "sometimes";
      }).services.presenced.leaf.description.jetstream
      null
  );

  seedWithoutHub = eval {
    enable = true;
    hub.nkeySeedFile = "/var/lib/secrets/leaf.nk";
  };
in
{
  # The trap: nixpkgs renders `"jetstream": {}` when this is off, which
  # turns JetStream on anyway; the module must say so explicitly.
  testJetStreamExplicitlyOn = {
    expr = nats.enable && nats.jetstream;
    expected = true;
  };

  testSiteAndStore = {
    expr = {
      inherit (desc) site;
      inherit (desc.jetstream) store_dir;
    };
    expected = {
      site = "home";
      store_dir = "/var/lib/nats";
    };
  };

  testNoNixRenderedSettings = {
    expr = nats.settings;
    expected = { };
  };

  testServerNameFromSite = {
    expr = desc.server_name;
    expected = "leaf-home";
  };

  testLoopbackByDefault = {
    expr = {
      inherit (desc) listen monitor_port;
    };
    expected = {
      listen = "127.0.0.1:4222";
      monitor_port = 8222;
    };
  };

  testNoRemoteWithoutHub = {
    expr = desc ? hub;
    expected = false;
  };

  testStandaloneStartsOnRenderedConfig = {
    expr = standalone.systemd.services.nats.serviceConfig;
    expected = {
      ExecStart = "${stubs.pkgs.nats-server}/bin/nats-server -c ${confDir}/nats.conf";
    };
  };

  # `presenced provision`, `watch` and `status` by hand on the leaf's host.
  testLeafInstallsCommands = {
    expr = standalone.environment.systemPackages;
    expected = [
      stubs.pkgs.natscli
      stubs.pkgs.presenced
    ];
  };

  testNoFirewallByDefault = {
    expr = standalone.networking.firewall.interfaces;
    expected = { };
  };

  testRemoteUrlsAndSeedInclude = {
    expr = linked.services.presenced.leaf.description.hub;
    expected = {
      urls = [
        "nats-leaf://192.0.2.11:7422"
        "nats-leaf://192.0.2.12:7422"
      ];
      nkey_include = "leaf-nkey.conf";
    };
  };

  testSyncOneSecondByDefault = {
    expr = desc.jetstream.sync_interval;
    expected = "1s";
  };

  testSyncServerDefaultWhenNull = {
    expr = serverDefaultSync.services.presenced.leaf.description.jetstream.sync_interval;
    expected = "server-default";
  };

  testSyncAlwaysRenamed = {
    expr = {
      sync = oldSyncAlways.services.presenced.leaf.description.jetstream.sync_interval;
      warned = lib.any (lib.hasInfix "syncAlways") oldSyncAlways.warnings;
    };
    expected = {
      sync = "always";
      warned = true;
    };
  };

  testSyncIntervalRejectsNonDuration = {
    expr = badSync.success;
    expected = false;
  };

  testSyncAlways = {
    expr = linked.services.presenced.leaf.description.jetstream.sync_interval;
    expected = "always";
  };

  testSeedAsCredentialAndRuntimeConfig = {
    expr = {
      inherit (linkedUnit)
        LoadCredential
        RuntimeDirectory
        ExecStart
        ExecStartPre
        ;
    };
    expected = {
      LoadCredential = [ "leaf-nkey-seed:/var/lib/secrets/leaf.nk" ];
      RuntimeDirectory = [ "nats-leaf" ];
      ExecStart = "${stubs.pkgs.nats-server}/bin/nats-server -c /run/nats-leaf/nats.conf";
      ExecStartPre = [ (stubs.fakeFile "nats-leaf-assemble-config") ];
    };
  };

  testFirewallOnlyOnContainerInterfaces = {
    expr = {
      inherit (linked.networking.firewall) interfaces allowedTCPPorts;
    };
    expected = {
      interfaces."ve-+".allowedTCPPorts = [ 4222 ];
      allowedTCPPorts = [ ];
    };
  };

  testAclIncludedFromStore = {
    expr = {
      inherit (withAcl.systemd.services.nats.serviceConfig) ExecStart;
      include = withAcl.services.presenced.leaf.description.authorization_include;
    };
    expected = {
      ExecStart = "${stubs.pkgs.nats-server}/bin/nats-server -c ${confDir}/nats.conf";
      include = "authorization.conf";
    };
  };

  testAclNeedsNoCredential = {
    expr = withAcl.systemd.services.nats.serviceConfig ? LoadCredential;
    expected = false;
  };

  testValidPasses = {
    expr = stubs.failedAssertions linked;
    expected = [ ];
  };

  testSeedInStoreRefused = {
    expr = map (lib.hasInfix "nkeySeedFile is in the Nix store") (stubs.failedAssertions seedInStore);
    expected = [ true ];
  };

  testSeedWithoutHubRefused = {
    expr = map (lib.hasInfix "hub.urls is empty") (stubs.failedAssertions seedWithoutHub);
    expected = [ true ];
  };

  testNoBuildPackageRefused = {
    expr = lib.length (stubs.failedAssertions aclNoBuildPackage);
    expected = 1;
  };

  testAclPrerenderedAccepted = {
    expr = stubs.failedAssertions aclPrerendered;
    expected = [ ];
  };
}
