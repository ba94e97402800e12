# Sourced by scripts/install/*.sh: apt_ensure TAG PACKAGE... installs the Debian packages
# not yet installed (one apt-get update, non-interactive), so a second run costs ~1 s.
apt_ensure() {
    local tag=$1 p
    shift
    local missing=()
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    if ((${#missing[@]})); then
        echo "$tag: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}
