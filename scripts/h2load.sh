#!/usr/bin/env bash
# Make sure h2load (Debian's nghttp2-client) is installed: the benchmark's load generator.
set -euo pipefail
if ! command -v h2load >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "h2load is missing: install nghttp2-client (apt-get install nghttp2-client)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null
fi
command -v h2load
