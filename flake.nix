{
  description = "presenced: presence detection for NixOS edge hosts, durable in NATS JetStream";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      # Edge hosts are often ARM boards.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # VM tests run by `nix flake check`; every test in
      # nix/tests/default.nix is also reachable as
      # `legacyPackages.<system>.vmTests.<name>`.
      checkedVmTests = [
        "basic"
        "containers"
        "cluster"
        "archive"
        "acl"
        "failover"
        "failover-hosts"
      ];

      # Makes this flake's package the default of services.presenced.package.
      # The key lets the module system load it once, however many of the
      # modules below are imported together.
      packageDefault = {
        key = "presenced-flake-package-default";
        imports = [
          (
            { pkgs, ... }:
            {
              services.presenced.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
              # What runs at build time: the build machine's own package
              # when building for another platform (cross).
              services.presenced.buildPackage = lib.mkDefault (
                if pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform then
                  self.packages.${pkgs.stdenv.hostPlatform.system}.default
                else
                  self.packages.${pkgs.stdenv.buildPlatform.system}.default or null
              );
            }
          )
        ];
      };

      vmTests = pkgs: import ./nix/tests { inherit pkgs self; };

      mkHost =
        system: modules:
        lib.nixosSystem {
          modules = [
            self.nixosModules.default
            { nixpkgs.hostPlatform = system; }
          ]
          ++ modules;
        };
    in
    {
      packages = forAllSystems (pkgs: {
        presenced = pkgs.callPackage ./nix/package.nix { };
        default = self.packages.${pkgs.stdenv.hostPlatform.system}.presenced;
      });

      overlays.default = final: _prev: { presenced = final.callPackage ./nix/package.nix { }; };

      nixosModules = {
        presenced = {
          imports = [
            ./modules/presenced.nix
            packageDefault
          ];
        };
        nats-leaf = {
          imports = [
            ./modules/nats-leaf.nix
            packageDefault
          ];
        };
        nats-hub = {
          imports = [
            ./modules/nats-hub.nix
            packageDefault
          ];
        };
        default = {
          imports = [
            self.nixosModules.presenced
            self.nixosModules.nats-leaf
            self.nixosModules.nats-hub
          ];
        };
      };

      # Example hosts. Edge boards are often aarch64-linux: change the
      # system of edge-example to match the hardware.
      nixosConfigurations = {
        edge-example = mkHost "x86_64-linux" [ ./hosts/edge-example.nix ];
        hub-1 = mkHost "x86_64-linux" [ ./hosts/hub-1.nix ];
        hub-2 = mkHost "x86_64-linux" [ ./hosts/hub-2.nix ];
        hub-3 = mkHost "x86_64-linux" [ ./hosts/hub-3.nix ];
      };

      checks = forAllSystems (
        pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
        in
        {
          # The package build runs the crate's tests against real servers.
          package = self.packages.${system}.presenced;
          eval = pkgs.callPackage ./nix/tests/eval/check.nix { };
        }
        // lib.getAttrs checkedVmTests (vmTests pkgs)
      );

      legacyPackages = forAllSystems (pkgs: {
        vmTests = vmTests pkgs;
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.callPackage ./nix/devshell.nix {
          presenced = self.packages.${pkgs.stdenv.hostPlatform.system}.presenced;
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-tree);
    };
}
