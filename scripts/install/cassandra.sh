#!/usr/bin/env bash
# Install the Apache Cassandra test peer: cassandra-all and its runtime
# dependencies from Maven Central into a flat lib dir that
# scripts/peers/cassandra_server.py puts on the classpath.
#
# Idempotent: skips the download when the lib dir already holds the jar of
# the pinned version.  Needs java 17 and mvn (Debian: openjdk-17-jre-headless
# maven); installs them with apt-get when they are missing.
#
#   DBPROXY_CASSANDRA_LIB   lib dir (default $HOME/.cache/dbproxy/cassandra/lib)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pom_dir="$here/../peers/cassandra"
lib="${DBPROXY_CASSANDRA_LIB:-$HOME/.cache/dbproxy/cassandra/lib}"

if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless maven
fi

version="$(sed -n 's:.*<cassandra.version>\(.*\)</cassandra.version>.*:\1:p' "$pom_dir/pom.xml")"
if [ -f "$lib/cassandra-all-$version.jar" ]; then
    echo "cassandra $version: already in $lib"
    exit 0
fi

# Fill a sibling dir and swap it in, so an interrupted run never leaves a
# half-filled lib dir that the check above would take for complete.
tmp="$lib.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
start=$(date +%s)
# mvn 3.8 -q still prints bare colour resets; strip them (pipefail keeps
# mvn's exit status).
mvn -q -B -f "$pom_dir/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$tmp" 2>&1 | sed 's/\x1b\[[0-9;]*m//g'
rm -rf "$lib"
mv "$tmp" "$lib"
echo "cassandra $version: $(ls "$lib" | wc -l) jars, $(du -sh "$lib" | cut -f1) in $lib ($(( $(date +%s) - start )) s)"
