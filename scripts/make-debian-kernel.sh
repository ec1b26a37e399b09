#!/usr/bin/env bash
# Turns the host's Debian cloud kernel into banger's `default` kernel: the
# kernel image plus a generated initramfs carrying the virtio modules and
# the static guest agent (which mounts the VM's root disk and serves).
#
#   scripts/make-debian-kernel.sh [--name NAME] [--force] [VERSION|DIR]
#
# 1. Installs linux-image-cloud-amd64 when no /boot/vmlinuz-*-cloud-amd64
#    exists and no VERSION or DIR is given.
# 2. Builds the static agent (scripts/build-agent.sh) and installs it as
#    /usr/local/lib/banger/banger-agent, where bangerd looks for it unless
#    `[agent] path` says otherwise.
# 3. Runs `banger kernel import NAME --from-debian [VERSION|DIR]`, unless a
#    kernel NAME exists (then nothing is done; --force replaces it).
set -euo pipefail
cd "$(dirname "$0")/.."

name=default
force=0
source_arg=()
while [ $# -gt 0 ]; do
    case "$1" in
        --name) name="$2"; shift 2 ;;
        --force) force=1; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; exit 2 ;;
        *) source_arg=("$1"); shift ;;
    esac
done

banger=${BANGER:-banger}
if ! command -v "$banger" >/dev/null; then
    echo "error: $banger is not on PATH (set BANGER=path/to/banger)" >&2
    exit 1
fi

if "$banger" kernel show "$name" >/dev/null 2>&1; then
    if [ "$force" -eq 0 ]; then
        echo "kernel $name exists; nothing to do (--force replaces it)"
        exit 0
    fi
fi

if [ ${#source_arg[@]} -eq 0 ] && ! ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1; then
    echo "installing linux-image-cloud-amd64" >&2
    apt-get install -y linux-image-cloud-amd64 >&2
fi

agent="$(scripts/build-agent.sh)"
install_path=/usr/local/lib/banger/banger-agent
if [ -w "$(dirname "$install_path")" ] || [ "$(id -u)" -eq 0 ]; then
    install -D -m 0755 "$agent" "$install_path"
    echo "installed the agent as $install_path" >&2
else
    echo "note: cannot write $install_path; bangerd needs \`[agent] path = \"$agent\"\`" >&2
fi

if [ "$force" -eq 1 ] && "$banger" kernel show "$name" >/dev/null 2>&1; then
    "$banger" kernel rm "$name"
fi
"$banger" kernel import "$name" --from-debian "${source_arg[@]}"
