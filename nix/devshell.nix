# Everything needed to build and test presenced by hand: the Rust toolchain,
# the real servers the tests start, the NATS CLI and an S3 server standing
# in for Wasabi.
{
  mkShell,
  presenced,
  cargo,
  clippy,
  rustc,
  rustfmt,
  rust-analyzer,
  nats-server,
  natscli,
  mosquitto,
  seaweedfs,
  nixfmt,
}:

mkShell {
  inputsFrom = [ presenced ];
  packages = [
    cargo
    clippy
    rustc
    rustfmt
    rust-analyzer
    nats-server
    natscli
    mosquitto
    seaweedfs
    nixfmt
  ];

  NATS_SERVER = "${nats-server}/bin/nats-server";
  MOSQUITTO = "${mosquitto}/bin/mosquitto";
  WEED = "${seaweedfs}/bin/weed";
}
