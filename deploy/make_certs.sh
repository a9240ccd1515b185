#!/usr/bin/env bash
# Make a private CA and a SuperLink server certificate signed by it (openssl), for Flower's TLS.
#
#   deploy/make_certs.sh [OUT_DIR] [SAN ...]
#
# OUT_DIR (default deploy/certs) receives ca.crt, ca.key, server.pem, server.key. Each SAN is an IP address or a
# DNS name the SuperNodes and the `flwr` CLI use to reach the SuperLink, e.g.
# `deploy/make_certs.sh deploy/certs 192.168.1.10 server.lan`; 127.0.0.1 and localhost are always added (the
# SuperLink's own SuperExec connects over loopback). Copy ca.crt (only) to every SuperNode and CLI machine;
# ca.key and server.key stay on the SuperLink machine.
set -euo pipefail
OUT=${1:-deploy/certs}
shift || true
SANS=("$@" 127.0.0.1 localhost)
DAYS=${DAYS:-365}
mkdir -p "$OUT"
san_list=""
for s in "${SANS[@]}"; do
  if [[ $s =~ ^[0-9.]+$ || $s == *:* ]]; then san_list+="IP:$s,"; else san_list+="DNS:$s,"; fi
done
san_list=${san_list%,}
umask 077
openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$DAYS" -subj "/CN=fl-sim test CA" \
  -keyout "$OUT/ca.key" -out "$OUT/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=${SANS[0]}" \
  -keyout "$OUT/server.key" -out "$OUT/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san_list" > "$OUT/server.ext"
openssl x509 -req -sha256 -days "$DAYS" -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" \
  -CAcreateserial -extfile "$OUT/server.ext" -out "$OUT/server.pem" 2>/dev/null
rm -f "$OUT/server.csr" "$OUT/server.ext" "$OUT/ca.srl"
chmod 644 "$OUT/ca.crt" "$OUT/server.pem"
echo "wrote $OUT/ca.crt $OUT/server.pem $OUT/server.key (SAN: $san_list)"
