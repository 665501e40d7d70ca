# The presenced package. Its tests run in checkPhase against real servers
# (nats-server, Mosquitto and SeaweedFS as the S3 server, from nixpkgs),
# which listen on 127.0.0.1: the
# build sandbox has a loopback interface.
{
  lib,
  rustPlatform,
  nats-server,
  mosquitto,
  seaweedfs,
}:

let
  cargoToml = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = cargoToml.package.name;
  inherit (cargoToml.package) version;

  # Only what cargo reads, so editing docs or Nix files does not rebuild.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      (lib.fileset.maybeMissing ../tests)
      (lib.fileset.maybeMissing ../benches)
      # Tests check that every shipped example config is valid.
      ../examples
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  nativeCheckInputs = [
    nats-server
    mosquitto
    seaweedfs
  ];

  # The test harness finds the servers on PATH; name them anyway, so a
  # different binary on PATH cannot sneak in.
  preCheck = ''
    export NATS_SERVER=${nats-server}/bin/nats-server
    export MOSQUITTO=${mosquitto}/bin/mosquitto
    export WEED=${seaweedfs}/bin/weed
  '';

  # Tests that cannot run in the build sandbox, each with the reason.
  # None so far: every test talks to servers it starts on 127.0.0.1.
  checkFlags = map (name: "--skip=${name}") [ ];

  meta = {
    inherit (cargoToml.package) description;
    license = lib.licenses.asl20;
    mainProgram = "presenced";
    platforms = lib.platforms.linux;
  };
}
