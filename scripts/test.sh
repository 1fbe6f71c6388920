#!/usr/bin/env bash
# Runs the whole test suite as root (the integration tests start real daemons
# that manage cgroups, mounts and CRIU). Arguments go to `cargo test`.
#
#   scripts/test.sh                      # everything, the VM tier included
#   SPRITED_VM_SUITES=trixie scripts/test.sh    # one guest kernel (as CI)
#   scripts/test.sh --test foundation    # one integration test file
#
# With SPRITED_REQUIRE_PRIVILEGED=1 (as in CI) a privileged test that cannot
# run fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  exec sudo -E env "PATH=$PATH" "$0" "$@"
fi
# The VM tier (vm-tests/) is part of the suite: SPRITED_VM_SUITES picks the
# guests (default bookworm,trixie; CI runs trixie only).
exec cargo test --features vm "$@"
