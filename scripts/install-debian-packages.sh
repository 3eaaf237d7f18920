#!/usr/bin/env bash
# Installs the Debian packages that the tests on real sockets need, when they are missing:
#   postfix  -> /usr/sbin/smtp-source and /usr/sbin/smtp-sink (SMTP client and server load tools)
#   swaks    -> the Swiss Army Knife for SMTP (scripted client)
#   nsd      -> a real authoritative DNS server, run by the tests on a loopback port
#   libnet-ssleay-perl, libio-socket-ssl-perl -> STARTTLS for swaks
#   libmail-dkim-perl -> Mail::DKIM, the independent DKIM verifier of the signing tests
#   prometheus -> promtool: checks and unit-tests the chart's alert rules and lints /metrics
#   nmap     -> an independent open-relay check (--script smtp-open-relay), tests/security
#   testssl.sh -> the listener's STARTTLS protocols and ciphers, tests/security
#   ldnsutils -> ldns-keygen/ldns-signzone: the DNSSEC-signed test zones of the DANE tests
#   unbound  -> a real validating resolver on a loopback port (the DANE tests' trusted resolver)
# Idempotent and fast when everything is present (no apt call at all). Only acts as root; a
# non-root developer is told what is missing and the tests that need it are skipped.
# No daemon is left running: services are kept from starting during the install and any
# system postfix/nsd/prometheus that did start is stopped, so nothing listens on 25, 53 or 9090.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

# package -> a file that proves it is installed
declare -A PROBES=(
    [postfix]=/usr/sbin/smtp-sink
    [swaks]=swaks
    [nsd]=/usr/sbin/nsd
    [prometheus]=/usr/bin/promtool
    [libnet-ssleay-perl]=perl
    [libio-socket-ssl-perl]=perl
    [nmap]=nmap
    [testssl.sh]=testssl
    [libmail-dkim-perl]=perl
    [ldnsutils]=/usr/bin/ldns-signzone
    [unbound]=/usr/sbin/unbound
)
PACKAGES=(postfix swaks nsd libnet-ssleay-perl libio-socket-ssl-perl prometheus nmap testssl.sh libmail-dkim-perl ldnsutils unbound)

present() {
    local package=$1 probe=$2
    # dpkg-query, not `dpkg -s | grep -q`: grep -q stops reading early, and under pipefail the
    # SIGPIPE that dpkg then gets (a package with a long description) reads as "missing".
    [[ $(dpkg-query -W -f='${Status}' "$package" 2>/dev/null) == "install ok installed" ]] || return 1
    if [[ $probe == /* ]]; then [[ -x $probe ]]; else command -v "$probe" >/dev/null; fi
}

missing=()
for package in "${PACKAGES[@]}"; do
    present "$package" "${PROBES[$package]}" || missing+=("$package")
done

if ((${#missing[@]} == 0)); then
    echo "==> Debian test packages present (${PACKAGES[*]})"
    exit 0
fi

if ((EUID != 0)); then
    echo "==> missing Debian packages: ${missing[*]}"
    echo "    the tests that need them will be skipped; install them with:"
    echo "    sudo bash scripts/install-debian-packages.sh   (or run 'make test' as root)"
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    echo "==> no apt-get here: cannot install ${missing[*]}; the tests that need them will be skipped"
    exit 0
fi

echo "==> installing Debian packages: ${missing[*]}"

# Postfix as "No configuration": the binaries only, no main.cf, no system mail server.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections

# Keep every service from starting while the packages install (invoke-rc.d honours this).
policy=/usr/sbin/policy-rc.d
backup=""
if [[ -e $policy ]]; then
    backup=$(mktemp)
    cp -p "$policy" "$backup"
fi
restore_policy() {
    if [[ -n $backup ]]; then
        mv -f "$backup" "$policy"
    else
        rm -f "$policy"
    fi
}
trap restore_policy EXIT
printf '#!/bin/sh\n# installed by scripts/install-debian-packages.sh while it runs\nexit 101\n' >"$policy"
chmod 755 "$policy"

apt_install() {
    apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"
}

if ! apt_install "${missing[@]}"; then
    echo "==> install failed; refreshing the package lists (apt-get update) and retrying"
    apt-get update -q
    apt_install "${missing[@]}"
fi

restore_policy
trap - EXIT

# Make sure no system daemon is left running, listening on port 25 or 53, or starting at boot:
# the tests run their own on loopback ports. Only for the packages installed just now, so that
# a mail or DNS server that the machine already had stays as it was.
for package in "${missing[@]}"; do
    case $package in
        postfix) service=postfix pidfile=/var/spool/postfix/pid/master.pid ;;
        nsd) service=nsd pidfile=/run/nsd/nsd.pid ;;
        prometheus) service=prometheus pidfile=/run/prometheus/prometheus.pid ;;
        unbound) service=unbound pidfile=/run/unbound.pid ;;
        *) continue ;;
    esac
    if [[ -d /run/systemd/system ]] && systemctl is-active --quiet "$service" 2>/dev/null; then
        echo "==> stopping the system $service service"
        systemctl stop "$service" || true
    fi
    # The system daemon by its pid file: never the ones that the tests run from temp folders.
    pid=$(cat "$pidfile" 2>/dev/null || true)
    pid=${pid//[^0-9]/}
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        echo "==> stopping the system $service daemon (pid $pid)"
        if [[ -x /etc/init.d/$service ]]; then /etc/init.d/"$service" stop || true; fi
        if kill -0 "$pid" 2>/dev/null; then kill "$pid" || true; fi
    fi
    echo "==> disabling the system $service service at boot"
    if command -v systemctl >/dev/null; then
        systemctl disable --quiet "$service" 2>/dev/null || true
    elif command -v update-rc.d >/dev/null; then
        update-rc.d "$service" disable >/dev/null 2>&1 || true
    fi
done
if command -v ss >/dev/null && ss -Hltnu '( sport = :25 or sport = :53 )' 2>/dev/null | grep -q .; then
    echo "==> note: something listens on port 25 or 53 (not started by this script):"
    ss -Hltnup '( sport = :25 or sport = :53 )' || true
fi

for package in "${PACKAGES[@]}"; do
    if ! present "$package" "${PROBES[$package]}"; then
        echo "==> $package is still missing after the install" >&2
        exit 1
    fi
done
echo "==> Debian test packages installed (${PACKAGES[*]})"
