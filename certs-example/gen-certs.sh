#!/usr/bin/env bash
# Generates THROWAWAY certificates for trying knutepunkt locally; never use them in production.
#   ./certs-example/gen-certs.sh [OUT_DIR]        (default: certs-example/out)
# Writes:
#   ca.crt / ca.key                   a private CA (valid 30 days)
#   server.crt / server.key           the gateway's server certificate: localhost, 127.0.0.1, ::1
#   vendor-acme.crt / .key            client certificate for vendor "acme"  (CN=acme)
#   vendor-bravo.crt / .key           client certificate for vendor "bravo" (CN=bravo)
# Client certificates carry the vendor name as CN and as a URI SAN (urn:knutepunkt:vendor:NAME),
# with extendedKeyUsage clientAuth; the server certificate has serverAuth.
set -euo pipefail
out=${1:-"$(dirname "$0")/out"}
mkdir -p "$out"
cd "$out"
days=30

openssl req -x509 -newkey rsa:3072 -nodes -days "$days" -subj "/CN=knutepunkt example CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout ca.key -out ca.crt 2>/dev/null

sign() { # name subject extensions
  local name=$1 subj=$2 ext=$3
  openssl req -newkey rsa:2048 -nodes -subj "$subj" -keyout "$name.key" -out "$name.csr" 2>/dev/null
  printf '%s\n' "$ext" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
  chmod 600 "$name.key"
}

sign server "/CN=localhost" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"

for vendor in acme bravo; do
  sign "vendor-$vendor" "/CN=$vendor/O=knutepunkt example vendor" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectAltName=URI:urn:knutepunkt:vendor:$vendor"
done
chmod 600 ca.key
echo "wrote throwaway certificates to $out (valid $days days)"
