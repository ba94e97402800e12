#!/usr/bin/env bash
# Install the Mongo-wire test peers: FerretDB v1.24.2 (built with Go) and
# mongosh 2.12.0 (npm).  Idempotent: each part is skipped when the cached
# copy is already there at the pinned version (~1 s for a second run).
#
# FerretDB: scripts/peers/ferretdb/go.mod + go.sum pin the program as a Go
# `tool` (made once with `go get -tool github.com/FerretDB/FerretDB/cmd/ferretdb@v1.24.2`),
# so nothing here resolves versions.  FerretDB's build/version package panics
# at start-up unless build/version/version.txt is embedded, and that file is
# not in the published module (its release builds generate it).  Files under
# GOMODCACHE can't be overlaid, so we copy the FerretDB module (3.4 MB) to a
# scratch dir, add version.txt, and build through a temporary modfile that
# `replace`s the module with that copy; every other dependency comes from
# the module cache as go.sum pins it.
#   fresh machine: ~25 s downloads + ~80 s compile (2 cores).
#
# mongosh: `npm ci` from package.json + package-lock.json kept beside go.mod,
# with --ignore-scripts: the skipped scripts only build optional native
# add-ons (kerberos, os-dns-native, cpu-features) the tests don't use, and
# npm 11 skips dependency scripts by default anyway.  ~40 s fresh.
#
# Env overrides: DBPROXY_FERRETDB_BIN (binary path), DBPROXY_NODE_DIR
# (mongosh install prefix), GO, NPM.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/../peers/ferretdb" && pwd)
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/dbproxy
FERRETDB_BIN=${DBPROXY_FERRETDB_BIN:-$CACHE/bin/ferretdb}
NODE_DIR=${DBPROXY_NODE_DIR:-$CACHE/node}
FERRETDB_VERSION=v1.24.2
MONGOSH_VERSION=2.12.0
GO=${GO:-go}
NPM=${NPM:-npm}

if ! command -v "$GO" >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
    GO=/usr/local/go/bin/go
fi

ferretdb_ok() {
    # The output is captured first: with pipefail, `ferretdb --version | grep -q` fails whenever
    # grep exits at the first line before ferretdb has written the rest (SIGPIPE).
    local out
    [ -x "$FERRETDB_BIN" ] && out=$("$FERRETDB_BIN" --version 2>/dev/null) &&
        grep -qx "version: $FERRETDB_VERSION" <<<"$out"
}

if ferretdb_ok; then
    echo "mongo.sh: ferretdb $FERRETDB_VERSION present at $FERRETDB_BIN"
else
    echo "mongo.sh: building ferretdb $FERRETDB_VERSION -> $FERRETDB_BIN"
    t0=$SECONDS
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (
        cd "$HERE"
        export GOTOOLCHAIN=local GOFLAGS=-mod=readonly
        "$GO" mod download github.com/FerretDB/FerretDB
        src=$("$GO" list -m -f '{{.Dir}}' github.com/FerretDB/FerretDB)
        [ -n "$src" ] && [ -d "$src" ] || { echo "mongo.sh: FerretDB module not in cache" >&2; exit 1; }
        cp -r "$src" "$work/FerretDB"
        chmod -R u+w "$work/FerretDB"
        echo "$FERRETDB_VERSION" > "$work/FerretDB/build/version/version.txt"
        echo "dbproxy-test" > "$work/FerretDB/build/version/package.txt"
        cp go.mod "$work/build.mod"
        cp go.sum "$work/build.sum"
        "$GO" mod edit -modfile="$work/build.mod" \
            -replace "github.com/FerretDB/FerretDB=$work/FerretDB"
        mkdir -p "$(dirname "$FERRETDB_BIN")"
        "$GO" build -buildvcs=false -trimpath -modfile="$work/build.mod" \
            -o "$FERRETDB_BIN.tmp" github.com/FerretDB/FerretDB/cmd/ferretdb
        mv -f "$FERRETDB_BIN.tmp" "$FERRETDB_BIN"
    )
    ferretdb_ok || { echo "mongo.sh: built ferretdb does not report $FERRETDB_VERSION" >&2; exit 1; }
    echo "mongo.sh: ferretdb built in $((SECONDS - t0)) s"
fi

mongosh_ok() {
    [ -x "$NODE_DIR/node_modules/.bin/mongosh" ] &&
        cmp -s "$HERE/package-lock.json" "$NODE_DIR/package-lock.json" &&
        grep -q "\"version\": \"$MONGOSH_VERSION\"" "$NODE_DIR/node_modules/mongosh/package.json"
}

if mongosh_ok; then
    echo "mongo.sh: mongosh $MONGOSH_VERSION present in $NODE_DIR"
else
    echo "mongo.sh: npm ci mongosh $MONGOSH_VERSION -> $NODE_DIR"
    t0=$SECONDS
    mkdir -p "$NODE_DIR"
    cp "$HERE/package.json" "$HERE/package-lock.json" "$NODE_DIR/"
    "$NPM" ci --prefix "$NODE_DIR" --ignore-scripts --no-audit --no-fund --loglevel=error
    mongosh_ok || { echo "mongo.sh: mongosh install incomplete" >&2; exit 1; }
    echo "mongo.sh: mongosh installed in $((SECONDS - t0)) s"
fi

echo "mongo.sh: ok"
