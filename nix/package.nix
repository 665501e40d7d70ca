# The presenced package. Its tests run in checkPhase against real servers
# (nats-server, Mosquitto and SeaweedFS as the S3 server, from nixpkgs;
# Chromium for the report test),
# which listen on 127.0.0.1: the build sandbox has a loopback interface.
#
# The binary is built in the `dist` profile (fat LTO, for a small edge
# board; Cargo.toml); the tests are built in the dev profile and run as CI runs them
# (scripts/test.sh): `cargo nextest run --workspace --lib --bins --tests` with
# .config/nextest.toml, then the doc tests. Linking every test binary with
# fat LTO would take hours on a small builder and test another build than
# CI does.
{
  lib,
  stdenv,
  rustPlatform,
  installShellFiles,
  cargo-nextest,
  nats-server,
  mosquitto,
  seaweedfs,
  chromium,
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
      # Workspace members (the supervised-process crate the sandbox uses).
      ../crates
      # The test runner's profile (timeouts, no retries), as in CI.
      ../.config/nextest.toml
      (lib.fileset.maybeMissing ../tests)
      (lib.fileset.maybeMissing ../benches)
      # Tests check that every shipped example config is valid.
      ../examples
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  # Cargo.toml's shipping profile; `release` is the quick local build.
  buildType = "dist";

  nativeBuildInputs = [ installShellFiles ];

  # Completions and man pages come from the binary's own clap definitions
  # (`presenced completions`, `presenced man`), so they match the command
  # line; a cross build cannot run the binary and goes without.
  postInstall = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    installShellCompletion --cmd presenced \
      --bash <($out/bin/presenced completions bash) \
      --fish <($out/bin/presenced completions fish) \
      --zsh <($out/bin/presenced completions zsh)
    $out/bin/presenced man --out-dir man
    installManPage man/*.1
  '';

  nativeCheckInputs = [
    cargo-nextest
    nats-server
    mosquitto
    seaweedfs
    # The report test renders `presenced report` in headless Chromium.
    chromium
  ];

  # The test harness finds the servers on PATH; name them anyway, so a
  # different binary on PATH cannot sneak in.
  preCheck = ''
    export NATS_SERVER=${nats-server}/bin/nats-server
    export MOSQUITTO=${mosquitto}/bin/mosquitto
    export WEED=${seaweedfs}/bin/weed
    export CHROMIUM=${chromium}/bin/chromium
  '';

  # The same test list as CI, in the dev profile. No test is skipped: every
  # test talks to servers it starts on 127.0.0.1.
  checkPhase = ''
    runHook preCheck
    cargo nextest run --workspace --frozen --offline --cargo-profile dev \
      --lib --bins --tests --no-fail-fast -j "$NIX_BUILD_CORES"
    cargo test --workspace --frozen --offline --profile dev --doc
    runHook postCheck
  '';

  meta = {
    inherit (cargoToml.package) description;
    license = lib.licenses.asl20;
    mainProgram = "presenced";
    platforms = lib.platforms.linux;
  };
}
