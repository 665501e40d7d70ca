# The values JetStream's `sync_interval` takes, shared by the leaf and hub
# modules: `always`, or a Go duration such as `1s`, `500ms` or `2m`.
{ lib }:

{
  syncIntervalType = lib.types.nullOr (
    lib.types.strMatching "always|([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h))+"
  );
}
