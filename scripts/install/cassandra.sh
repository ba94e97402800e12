#!/usr/bin/env bash
# Install the Apache Cassandra test peer: cassandra-all and its runtime
# dependencies from Maven Central into a flat lib dir that
# scripts/peers/cassandra_server.py puts on the classpath.
#
# Then builds the Kerberos test authenticator (scripts/peers/cassandra-krb-auth,
# test infrastructure: Cassandra ships none) with Maven into
# $HOME/.cache/dbproxy/cassandra/krb-auth/, which cassandra_server.py adds to
# the classpath of a node started with kerberos=...
#
# Idempotent: skips the download when the lib dir already holds the jar of
# the pinned version, and the build when the jar's stamp (sha256 of the
# authenticator's pom.xml and sources) matches.  Needs java 17, javac and mvn
# (Debian: openjdk-17-jdk-headless maven); installs them with apt-get when
# they are missing.
#
#   DBPROXY_CASSANDRA_LIB   lib dir (default $HOME/.cache/dbproxy/cassandra/lib)
#   DBPROXY_CASSANDRA_KRB   authenticator dir (default $HOME/.cache/dbproxy/cassandra/krb-auth)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pom_dir="$here/../peers/cassandra"
lib="${DBPROXY_CASSANDRA_LIB:-$HOME/.cache/dbproxy/cassandra/lib}"

if ! command -v java >/dev/null || ! command -v javac >/dev/null || ! command -v mvn >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jdk-headless maven
fi

# The Kerberos test authenticator, built against cassandra-all (provided scope).
build_krb_auth() {
    local src="$here/../peers/cassandra-krb-auth"
    local out="${DBPROXY_CASSANDRA_KRB:-$HOME/.cache/dbproxy/cassandra/krb-auth}"
    # Same recipe as scripts/peers/cassandra_server.py's krb_auth_stamp().
    local stamp
    stamp="$(cd "$src" && find . -type f \( -name pom.xml -o -name '*.java' \) -not -path './target/*' \
        | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)"
    if [ -f "$out/cassandra-krb-auth.jar" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
        echo "cassandra kerberos authenticator: already built in $out"
        return
    fi
    local t0=$(date +%s)
    mvn -q -B -f "$src/pom.xml" package -Dmaven.test.skip=true 2>&1 | sed 's/\x1b\[[0-9;]*m//g'
    mkdir -p "$out"
    cp "$src/target/cassandra-krb-auth.jar" "$out/cassandra-krb-auth.jar.tmp"
    mv "$out/cassandra-krb-auth.jar.tmp" "$out/cassandra-krb-auth.jar"
    echo "$stamp" > "$out/stamp"
    rm -rf "$src/target"
    echo "cassandra kerberos authenticator: built in $out ($(( $(date +%s) - t0 )) s)"
}

version="$(sed -n 's:.*<cassandra.version>\(.*\)</cassandra.version>.*:\1:p' "$pom_dir/pom.xml")"
if [ -f "$lib/cassandra-all-$version.jar" ]; then
    echo "cassandra $version: already in $lib"
    build_krb_auth
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
build_krb_auth
