#!/usr/bin/env bash
# Makes this host resolve NAME.banger (VM names) where systemd-resolved
# does not route it: asks the running daemon's `doctor` for the dnsmasq line
# (`server=/DOMAIN/GATEWAY[#PORT]`), then
#   1. NetworkManager with its dnsmasq plugin: writes
#      /etc/NetworkManager/dnsmasq.d/banger.conf and reloads NetworkManager;
#   2. a dnsmasq service: writes /etc/dnsmasq.d/banger.conf and restarts it;
#   3. neither: prints the exact line to add by hand.
# Idempotent; does nothing when doctor says the host already resolves VM
# names (systemd-resolved, or a line already in place).
#
#   sudo ./scripts/host-dns.sh
set -euo pipefail

report=$(banger doctor --json 2>/dev/null || true)
line=$(printf '%s' "$report" | grep -o 'server=/[a-z0-9.-]*/[0-9.]*\(#[0-9]*\)\{0,1\}' | head -1 || true)
if [ -z "$line" ]; then
    echo "the host resolves VM names already (see \`banger doctor\`)"
    exit 0
fi
write_dropin() {
    local file=$1
    if [ -f "$file" ] && grep -qxF "$line" "$file"; then
        echo "$file already has $line"
        return 1
    fi
    install -d -m 0755 "$(dirname "$file")"
    printf '# Written by banger: VM names go to bangerd'"'"'s DNS server.\n%s\n' "$line" > "$file"
    echo "wrote $line to $file"
}
nm_dnsmasq=0
if command -v NetworkManager >/dev/null && systemctl is-active --quiet NetworkManager 2>/dev/null; then
    NetworkManager --print-config 2>/dev/null | grep -qE '^dns=dnsmasq' && nm_dnsmasq=1
fi
if [ "$nm_dnsmasq" -eq 1 ]; then
    write_dropin /etc/NetworkManager/dnsmasq.d/banger.conf && systemctl reload NetworkManager
elif command -v dnsmasq >/dev/null && [ -d /etc/dnsmasq.d ]; then
    write_dropin /etc/dnsmasq.d/banger.conf \
        && { systemctl is-active --quiet dnsmasq 2>/dev/null && systemctl restart dnsmasq || true; }
else
    gateway=$(printf '%s' "$line" | sed 's|server=/[^/]*/\([0-9.]*\).*|\1|')
    echo "no systemd-resolved, NetworkManager-dnsmasq or dnsmasq here; to resolve VM names on the host:"
    echo "  with dnsmasq:   $line"
    case "$line" in
        *'#'*) echo "  (resolv.conf cannot name a DNS port other than 53)" ;;
        *) echo "  or first in /etc/resolv.conf:   nameserver $gateway" ;;
    esac
    echo "banger ssh-config's ProxyCommand works without either."
fi
