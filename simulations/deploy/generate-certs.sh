#!/usr/bin/env bash
# Generate a private CA and a SuperLink TLS certificate signed by it (openssl).
#
#   simulations/deploy/generate-certs.sh DIR [HOST ...]
#
# DIR gets ca.crt (give it to every SuperNode and to the flwr CLI), ca.key
# (keep it offline), server.key and server.pem (the SuperLink's). Every HOST
# goes into the certificate's subjectAltName: list every name or IP address
# SuperNodes use to reach the SuperLink. localhost, 127.0.0.1 and ::1 are
# always added: the admin commands (flwr run, flwr supernode register) reach
# the SuperLink on the server itself (start-superlink.sh answers them only
# there). Certificates are valid for 365 days.
set -euo pipefail
dir=${1:?usage: generate-certs.sh DIR [HOST ...]}
shift
hosts=()
for h in "$@" localhost 127.0.0.1 ::1; do
  case " ${hosts[*]-} " in *" $h "*) ;; *) hosts+=("$h") ;; esac
done
mkdir -p "$dir"
cd "$dir"
san=""
for h in "${hosts[@]}"; do
  if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then entry="IP:$h"; else entry="DNS:$h"; fi
  san="${san:+$san,}$entry"
done
openssl req -x509 -newkey rsa:3072 -nodes -days 365 -subj "/CN=Bouquet FL CA" \
  -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:3072 -nodes -subj "/CN=${hosts[0]}" \
  -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
  -days 365 -sha256 -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key
echo "CA: $dir/ca.crt  SuperLink: $dir/server.pem $dir/server.key  (SAN: $san)"
