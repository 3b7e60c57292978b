#!/bin/sh
# Installs what sbpeer needs: Qpid Proton's Python binding for the Debian
# system Python (/usr/bin/python3). CI calls this before `go test`; the
# Service Bus peer tests fail, rather than skip, without it.
set -eu

if /usr/bin/python3 -c 'import proton' 2>/dev/null; then
	exit 0
fi

SUDO=
if [ "$(id -u)" -ne 0 ]; then
	SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q python3-qpid-proton
/usr/bin/python3 -c 'import proton; print("sbpeer: python3-qpid-proton", ".".join(map(str, proton.VERSION)))'
