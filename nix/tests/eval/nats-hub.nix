# Module logic of services.presenced.hub that needs no VM: routes,
# domain, authorization from leaf keys, firewall and assertions.
{ lib }:

let
  stubs = import ./stubs.nix { inherit lib; };
  module = ../../../modules/nats-hub.nix;

  nodes = {
    hub-1 = "192.0.2.11";
    hub-2 = "192.0.2.12";
    hub-3 = "192.0.2.13";
  };
  leafKey = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4";

  eval =
    hostName: hub:
    stubs.eval [
      module
      {
        networking.hostName = hostName;
        services.presenced.hub = hub;
      }
    ];

  hub2 = eval "hub-2" {
    enable = true;
    inherit nodes;
  };
  nats = hub2.services.nats;
  # What `presenced nats-config hub` is given.
  desc = hub2.services.presenced.hub.description;

  keyed = eval "hub-1" {
    enable = true;
    inherit nodes;
    leafNkeys.home = leafKey;
  };

  stranger = eval "hub-9" {
    enable = true;
    inherit nodes;
  };

  adminKey = "UAXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4";

  provisioning = eval "hub-1" {
    enable = true;
    inherit nodes;
    leafNkeys.home = leafKey;
    adminNkey = adminKey;
    provision = {
      sites = [
        "home"
        "office"
      ];
      nkeySeedFile = "/var/lib/secrets/admin.nk";
    };
  };
  provisionUnit = provisioning.systemd.services.presenced-provision-hub;

  openProvisioning = eval "hub-1" {
    enable = true;
    inherit nodes;
    port = 4333;
    provision.sites = [ "home" ];
  };

  keyedWithoutSeed = eval "hub-1" {
    enable = true;
    inherit nodes;
    leafNkeys.home = leafKey;
    provision.sites = [ "home" ];
  };

  seedWithoutAdminKey = eval "hub-1" {
    enable = true;
    inherit nodes;
    provision = {
      sites = [ "home" ];
      nkeySeedFile = "/var/lib/secrets/admin.nk";
    };
  };

  seedInStore = eval "hub-1" {
    enable = true;
    leafNkeys.home = leafKey;
    inherit nodes;
    adminNkey = adminKey;
    provision = {
      sites = [ "home" ];
      nkeySeedFile = "${builtins.storeDir}/abc-admin.nk";
    };
  };

  adminOnly = eval "hub-1" {
    enable = true;
    inherit nodes;
    adminNkey = adminKey;
  };

  small = eval "hub-1" {
    enable = true;
    nodes.hub-1 = "192.0.2.11";
  };
in
{
  testJetStreamExplicitlyOn = {
    expr = nats.enable && nats.jetstream;
    expected = true;
  };

  testHubSyncOneSecond = {
    expr = desc.jetstream.sync_interval;
    expected = "1s";
  };

  testHubStore = {
    expr = desc.jetstream.store_dir;
    expected = "/var/lib/nats";
  };

  testServerNameIsNode = {
    expr = desc.server_name;
    expected = "hub-2";
  };

  testNoNixRenderedSettings = {
    expr = nats.settings;
    expected = { };
  };

  testStartsOnRenderedConfig = {
    expr = hub2.systemd.services.nats.serviceConfig.ExecStart;
    expected = "${stubs.pkgs.nats-server}/bin/nats-server -c ${stubs.fakeFile "nats-hub-hub-2-conf"}/nats.conf";
  };

  testRoutesToPeersOnly = {
    expr = desc.cluster.routes;
    expected = [
      "nats-route://192.0.2.11:6222"
      "nats-route://192.0.2.13:6222"
    ];
  };

  testClusterAndLeafListen = {
    expr = {
      cluster = desc.cluster.listen;
      leaf = desc.leafnodes.listen;
      name = desc.cluster.name;
    };
    expected = {
      cluster = "0.0.0.0:6222";
      leaf = "0.0.0.0:7422";
      name = "presenced-hub";
    };
  };

  testMonitoringOnLoopback = {
    expr = {
      inherit (desc) monitor_port listen;
    };
    expected = {
      monitor_port = 8222;
      listen = "127.0.0.1:4222";
    };
  };

  testFirewallRouteAndLeafOnly = {
    expr = hub2.networking.firewall.allowedTCPPorts;
    expected = [
      6222
      7422
    ];
  };

  testOpenWithoutKeys = {
    expr = desc ? authorization_include;
    expected = false;
  };

  # With leaf keys the users and their permissions come from
  # `presenced acl-hub`, in a config directory the server starts from.
  testLeafKeysGoThroughAclHub = {
    expr = {
      include = keyed.services.presenced.hub.description.authorization_include;
      execStart = keyed.systemd.services.nats.serviceConfig.ExecStart;
    };
    expected = {
      include = "authorization.conf";
      execStart = "${stubs.pkgs.nats-server}/bin/nats-server -c ${stubs.fakeFile "nats-hub-hub-1-conf"}/nats.conf";
    };
  };

  testValidPasses = {
    expr = stubs.failedAssertions hub2 ++ hub2.warnings;
    expected = [ ];
  };

  testUnknownNodeRefused = {
    expr = map (lib.hasInfix "`hub-9`") (stubs.failedAssertions stranger);
    expected = [ true ];
  };

  testNoProvisioningWithoutSites = {
    expr = hub2.systemd.services ? presenced-provision-hub;
    expected = false;
  };

  testProvisionHubCommand = {
    expr = provisionUnit.serviceConfig.ExecStart;
    expected =
      "${stubs.pkgs.presenced}/bin/presenced provision-hub --server nats://127.0.0.1:4222"
      + " --replicas 3 --site home --site office --nkey-seed-file %d/hub-admin-nkey-seed";
  };

  testProvisionHubSeedAsCredential = {
    expr = provisionUnit.serviceConfig.LoadCredential;
    expected = [ "hub-admin-nkey-seed:/var/lib/secrets/admin.nk" ];
  };

  testProvisionHubAfterNats = {
    expr = {
      inherit (provisionUnit) after wantedBy;
      inherit (provisionUnit.serviceConfig)
        Type
        RemainAfterExit
        Restart
        DynamicUser
        ;
    };
    expected = {
      after = [
        "network-online.target"
        "nats.service"
      ];
      wantedBy = [ "multi-user.target" ];
      Type = "oneshot";
      RemainAfterExit = true;
      Restart = "on-failure";
      DynamicUser = true;
    };
  };

  testAdminKeyGoesThroughAclHub = {
    expr = provisioning.services.presenced.hub.description.authorization_include;
    expected = "authorization.conf";
  };

  # Declared identities only: without leaf keys no site could link.
  testAdminWithoutLeafKeysRefused = {
    expr = map (lib.hasInfix "no site's leaf") (stubs.failedAssertions adminOnly);
    expected = [ true ];
  };

  testProvisionInstallsCommand = {
    expr = {
      provisioning = provisioning.environment.systemPackages;
      plain = hub2.environment.systemPackages;
    };
    expected = {
      provisioning = [
        stubs.pkgs.natscli
        stubs.pkgs.presenced
      ];
      # `presenced watch --hub` and provision-hub by hand on every node.
      plain = [
        stubs.pkgs.natscli
        stubs.pkgs.presenced
      ];
    };
  };

  testProvisioningValidPasses = {
    expr = stubs.failedAssertions provisioning;
    expected = [ ];
  };

  testOpenHubProvisionsWithoutSeed = {
    expr = {
      exec = openProvisioning.systemd.services.presenced-provision-hub.serviceConfig.ExecStart;
      failed = stubs.failedAssertions openProvisioning;
    };
    expected = {
      exec = "${stubs.pkgs.presenced}/bin/presenced provision-hub --server nats://127.0.0.1:4333 --replicas 3 --site home";
      failed = [ ];
    };
  };

  testKeyedHubNeedsAdminSeed = {
    expr = map (lib.hasInfix "provision.nkeySeedFile is not set") (
      stubs.failedAssertions keyedWithoutSeed
    );
    expected = [ true ];
  };

  testSeedNeedsAdminKey = {
    expr = map (lib.hasInfix "adminNkey\nis not") (stubs.failedAssertions seedWithoutAdminKey);
    expected = [ true ];
  };

  testProvisionSeedInStoreRefused = {
    expr = map (lib.hasInfix "is in the Nix store") (stubs.failedAssertions seedInStore);
    expected = [ true ];
  };

  testFewerThanThreeWarns = {
    expr = map (lib.hasInfix "fewer than three") small.warnings;
    expected = [ true ];
  };
}
