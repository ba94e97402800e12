#!/usr/bin/env bash
# Install the Apache Kafka test peer: kafka_2.13 (the broker, KRaft controller
# and storage tool) and its runtime dependencies from Maven Central into a flat
# lib dir that scripts/peers/kafka_server.py puts on the classpath.
#
# Idempotent: skips the download when the lib dir already holds the jar of the
# pinned version.  Needs java 17 and mvn (Debian: openjdk-17-jdk-headless
# maven); installs them with apt-get when they are missing.
#
#   DBPROXY_KAFKA_LIB   lib dir (default $HOME/.cache/dbproxy/kafka/lib)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pom_dir="$here/../peers/kafka"
lib="${DBPROXY_KAFKA_LIB:-$HOME/.cache/dbproxy/kafka/lib}"

if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jdk-headless maven
fi

version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom_dir/pom.xml")"
if [ -f "$lib/kafka_2.13-$version.jar" ]; then
    echo "kafka $version: already in $lib"
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
echo "kafka $version: $(ls "$lib" | wc -l) jars, $(du -sh "$lib" | cut -f1) in $lib ($(( $(date +%s) - start )) s)"
