#!/usr/bin/env bash
# Idempotent setup for the integration tests on Debian 12: apt packages, a JDK >= 21 for
# Elasticsearch 9, the ES 9.2.0 integ-test zip (via Maven), and the .venv. Cheap when done.
set -euo pipefail
cd "$(dirname "$0")/.."

ES_VERSION=9.2.0   # 9.2.1+ integ-test zips are not on Maven Central
ES_ARTIFACT="org.elasticsearch.distribution.integ-test-zip:elasticsearch:${ES_VERSION}:zip"
CACHE="${POPVAULT_CACHE:-$HOME/.cache/popvault}"
ES_ZIP="$CACHE/elasticsearch-${ES_VERSION}.zip"
APT_PKGS=(dovecot-core dovecot-pop3d redis-server mpop getmail6 openssl)
export DEBIAN_FRONTEND=noninteractive

say() { printf '[install-deps] %s\n' "$*"; }
die() { printf '[install-deps] ERROR: %s\n' "$*" >&2; exit 1; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "not root and no sudo: cannot install apt packages"
  SUDO=(sudo DEBIAN_FRONTEND=noninteractive)
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" -eq 0 ]; then
    say "apt-get update"
    "${SUDO[@]}" apt-get update -qq
    APT_UPDATED=1
  fi
  say "apt-get install $*"
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- apt packages --------------------------------------------------------------------------
wanted=("${APT_PKGS[@]}")
[ -x .venv/bin/python ] || wanted+=(python3-venv)
missing=()
for p in "${wanted[@]}"; do installed "$p" || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  # The packages' postinst may start the system dovecot/redis on standard ports; harmless,
  # the harness runs its own instances on its own loopback ports.
  apt_install "${missing[@]}"
else
  say "apt packages present"
fi

# --- JDK >= 21 (Elasticsearch 9; the Debian 12 default java is 17) --------------------------
java_major() { sed -n 's/^JAVA_VERSION="\([0-9]*\).*/\1/p' "$1/release" 2>/dev/null; }
find_jdk() {
  local best="" best_v=0 d v
  for d in /usr/lib/jvm/*/; do
    d="${d%/}"
    [ -L "$d" ] || [ ! -x "$d/bin/java" ] && continue
    v="$(java_major "$d")"; v="${v:-0}"
    if [ "$v" -ge 21 ] && [ "$v" -gt "$best_v" ]; then best="$d"; best_v="$v"; fi
  done
  printf '%s' "$best"
}
JDK="$(find_jdk)"
if [ -z "$JDK" ]; then
  for pkg in openjdk-25-jdk-headless openjdk-21-jdk-headless; do
    if apt-cache show "$pkg" >/dev/null 2>&1; then apt_install "$pkg"; break; fi
  done
  JDK="$(find_jdk)"
  [ -n "$JDK" ] || die "no JDK >= 21 under /usr/lib/jvm and Debian offers none; install
  Temurin 21+ (https://adoptium.net, package temurin-21-jdk) then re-run"
fi
say "JDK for Elasticsearch: $JDK (Java $(java_major "$JDK"))"

# --- Elasticsearch integ-test zip ----------------------------------------------------------
zip_ok() { [ -s "$1" ] && python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).close()' "$1" 2>/dev/null; }
if zip_ok "$ES_ZIP"; then
  say "elasticsearch-${ES_VERSION}.zip cached in $CACHE"
else
  command -v mvn >/dev/null || apt_install maven
  mkdir -p "$CACHE"
  say "fetching $ES_ARTIFACT with mvn (about 100 MB)"
  mvn -q -B dependency:copy -Dartifact="$ES_ARTIFACT" -DoutputDirectory="$CACHE" \
    || die "mvn could not fetch $ES_ARTIFACT"
  zip_ok "$ES_ZIP" || die "$ES_ZIP is missing or not a valid zip after mvn"
fi

# --- Python venv ---------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  PY=""
  for c in python3.13 python3.12 python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY="$c"; break
    fi
  done
  [ -n "$PY" ] || die "need Python >= 3.11"
  say "creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=".venv/.popvault-deps"
want="$(cat pyproject.toml constraints-test.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  say "venv up to date"
else
  say "pip install -e '.[dev]' -c constraints-test.txt"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]' -c constraints-test.txt
  printf '%s\n' "$want" > "$stamp"
fi
say "done"
