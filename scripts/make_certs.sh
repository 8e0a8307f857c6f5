#!/usr/bin/env bash
# Make the TLS certificates and SuperNode authentication keys for a progfl deployment.
#
#   scripts/make_certs.sh [--out DIR] [--host NAME_OR_IP]... [--nodes N] [--days D] [--force]
#
# Writes into DIR (default ./certs):
#   ca.crt, ca.key           a self-signed certificate authority (RSA 4096). ca.crt goes to every
#                            SuperNode (--root-certificates) and to every machine running `flwr`;
#                            keep ca.key private (it is only needed to sign a new server cert).
#   server.crt, server.key   the SuperLink's certificate (RSA 4096, signed by the CA) with the
#                            subject alternative names 127.0.0.1, localhost and every --host given:
#                            list each name or IP address that SuperNodes and `flwr` use to reach
#                            the SuperLink, or TLS verification fails.
#   node-<i>, node-<i>.pub   with --nodes N, i = 0..N-1: one ECDSA P-384 key pair per SuperNode in
#                            OpenSSH format, the form Flower's SuperNode authentication reads. The
#                            private key node-<i> stays on device i (--auth-supernode-private-key);
#                            the public key node-<i>.pub is registered at the SuperLink
#                            (`flwr supernode register node-<i>.pub <connection>`, which
#                            `run.sh deploy superlink --auth-keys` does for you).
#
# Existing files are kept (so more node keys can be added later with a larger --nodes) unless
# --force is given. Needs openssl and ssh-keygen (package openssh-client).
set -euo pipefail

out="certs"
days=365
nodes=0
force=0
hosts=()

die() { printf 'make_certs.sh: error: %s\n' "$*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) [[ $# -ge 2 ]] || die "--out needs a directory"; out="$2"; shift 2 ;;
    --host) [[ $# -ge 2 ]] || die "--host needs a name or IP address"; hosts+=("$2"); shift 2 ;;
    --nodes) [[ $# -ge 2 ]] || die "--nodes needs a number"; nodes="$2"; shift 2 ;;
    --days) [[ $# -ge 2 ]] || die "--days needs a number"; days="$2"; shift 2 ;;
    --force) force=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (valid: --out, --host, --nodes, --days, --force, --help)" ;;
  esac
done
[[ "$nodes" =~ ^[0-9]+$ ]] || die "--nodes must be a non-negative integer, got '$nodes'"
[[ "$days" =~ ^[1-9][0-9]*$ ]] || die "--days must be a positive integer, got '$days'"
command -v openssl >/dev/null || die "openssl not found (install the openssl package)"
if [[ "$nodes" -gt 0 ]]; then
  command -v ssh-keygen >/dev/null || die "ssh-keygen not found (install the openssh-client package)"
fi

mkdir -p "$out"
chmod 700 "$out"

# Subject alternative names: always 127.0.0.1 and localhost, then every --host (IP or DNS name).
san="IP:127.0.0.1,DNS:localhost"
for h in "${hosts[@]+"${hosts[@]}"}"; do
  [[ "$h" =~ ^[A-Za-z0-9.:-]+$ ]] || die "--host '$h' is not a host name or IP address"
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then
    san+=",IP:$h"
  else
    san+=",DNS:$h"
  fi
done

if [[ "$force" -eq 1 || ! -f "$out/ca.crt" || ! -f "$out/server.crt" ]]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  openssl genrsa -out "$out/ca.key" 4096 2>/dev/null
  openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$days" -subj "/CN=progfl CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$out/ca.crt" 2>/dev/null
  openssl genrsa -out "$out/server.key" 4096 2>/dev/null
  openssl req -new -key "$out/server.key" -subj "/CN=progfl SuperLink" -out "$tmp/server.csr" 2>/dev/null
  cat >"$tmp/ext.cnf" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EXT
  openssl x509 -req -in "$tmp/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -days "$days" -sha256 -extfile "$tmp/ext.cnf" -out "$out/server.crt" 2>/dev/null
  rm -f "$out/ca.srl"
  chmod 600 "$out/ca.key" "$out/server.key"
  printf 'make_certs.sh: wrote %s/ca.crt, ca.key, server.crt, server.key (SAN %s)\n' "$out" "$san" >&2
else
  printf 'make_certs.sh: keeping the existing CA and server certificate in %s (--force to replace)\n' "$out" >&2
fi

for ((i = 0; i < nodes; i++)); do
  key="$out/node-$i"
  if [[ "$force" -eq 1 ]]; then rm -f "$key" "$key.pub"; fi
  if [[ ! -f "$key" ]]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "progfl-node-$i" -f "$key"
    printf 'make_certs.sh: wrote SuperNode key pair %s, %s.pub\n' "$key" "$key" >&2
  fi
done
