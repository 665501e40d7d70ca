# systemd sandbox shared by the presenced daemons and the provisioning
# oneshots (presenced.nix, nats-hub.nix). AF_UNIX stays allowed: sd_notify
# (READY=1, WATCHDOG=1) talks over a unix socket.
{
  AmbientCapabilities = "";
  CapabilityBoundingSet = "";
  DevicePolicy = "closed";
  DynamicUser = true;
  LockPersonality = true;
  MemoryDenyWriteExecute = true;
  NoNewPrivileges = true;
  PrivateTmp = true;
  ProcSubset = "pid";
  ProtectClock = true;
  ProtectControlGroups = true;
  ProtectHome = true;
  ProtectHostname = true;
  ProtectKernelLogs = true;
  ProtectKernelModules = true;
  ProtectKernelTunables = true;
  ProtectProc = "invisible";
  ProtectSystem = "strict";
  RemoveIPC = true;
  RestrictAddressFamilies = [
    "AF_UNIX"
    "AF_INET"
    "AF_INET6"
  ];
  RestrictNamespaces = true;
  RestrictRealtime = true;
  RestrictSUIDSGID = true;
  SystemCallArchitectures = "native";
  SystemCallErrorNumber = "EPERM";
  SystemCallFilter = [
    "@system-service"
    "~@privileged"
    "~@resources"
  ];
  UMask = "0077";
}
