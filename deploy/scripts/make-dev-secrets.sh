#!/usr/bin/env bash
# Development certificates and passwords for deploy/, printed as Kubernetes Secrets.
#
#   deploy/scripts/make-dev-secrets.sh NAMESPACE RANK_ID... > secrets.yaml
#   kubectl apply -n NAMESPACE -f secrets.yaml
#
# RANK_IDs are the serving pods' names (moe-serving-0 moe-serving-1 ...). Keys,
# certificates and passwords are written to $PKI_DIR (default ./elastic-ep-dev-pki) and
# reused when run again, so adding ranks keeps the CA and the other passwords.
# FOR DEVELOPMENT ONLY: the CA key lies unencrypted beside the certificates and nothing
# can revoke them. In production issue them from your own CA (see deploy/README.md).
set -euo pipefail

if (($# < 2)); then
  echo "usage: $0 NAMESPACE RANK_ID... > secrets.yaml" >&2
  exit 2
fi
ns=$1
shift
dir=${PKI_DIR:-elastic-ep-dev-pki}
days=${DAYS:-30}
for tool in openssl kubectl; do
  command -v "$tool" >/dev/null || { echo "$0: needs $tool" >&2; exit 1; }
done
mkdir -p "$dir/passwords" "$dir/ranks"
chmod 700 "$dir"

key() {  # EC P-256, as etcd and gRPC accept
  [[ -e $1 ]] || { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod 600 "$1"; }
}

# leaf NAME CN EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]
leaf() {
  local name=$1 cn=$2 eku=$3 san=${4:-}
  key "$dir/$name.key"
  [[ -e $dir/$name.crt ]] && return
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature"
    echo "extendedKeyUsage=$eku"
    [[ -n $san ]] && echo "subjectAltName=$san"
  } >"$dir/$name.ext"
  openssl req -new -key "$dir/$name.key" -subj "/CN=$cn" -out "$dir/$name.csr"
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -sha256 -days "$days" -extfile "$dir/$name.ext" -out "$dir/$name.crt" 2>/dev/null
  rm -f "$dir/$name.csr" "$dir/$name.ext"
}

password() {
  [[ -e $1 ]] || { (umask 077 && openssl rand -hex 24 >"$1"); }
}

key "$dir/ca.key"
[[ -e $dir/ca.crt ]] || openssl req -x509 -new -key "$dir/ca.key" -sha256 -days "$days" \
  -subj "/CN=elastic-ep dev CA ($ns)" -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$dir/ca.crt"

svc="etcd.$ns.svc"
# clientAuth beside serverAuth: etcd dials its own client port with this certificate.
leaf server localhost serverAuth,clientAuth \
  "DNS:etcd-client,DNS:etcd-client.$ns,DNS:etcd-client.$ns.svc,DNS:etcd-client.$ns.svc.cluster.local,DNS:*.$svc,DNS:*.$svc.cluster.local,DNS:localhost,IP:127.0.0.1"
leaf peer etcd-peer serverAuth,clientAuth "DNS:*.$svc,DNS:*.$svc.cluster.local"
# A client certificate's CN is the etcd user it acts as when it sends no password.
leaf admin root clientAuth
leaf controller elastic-ep-controller clientAuth
leaf rank elastic-ep-rank clientAuth
password "$dir/passwords/root"
password "$dir/passwords/controller"
for rank in "$@"; do
  password "$dir/ranks/$rank"
done

tls_secret() {  # NAME STEM
  kubectl create secret generic "$1" --namespace "$ns" --dry-run=client -o yaml \
    --from-file=ca.crt="$dir/ca.crt" --from-file=tls.crt="$dir/$2.crt" --from-file=tls.key="$dir/$2.key"
  echo ---
}
tls_secret etcd-server-tls server
tls_secret etcd-peer-tls peer
tls_secret elastic-ep-etcd-admin-tls admin
tls_secret elastic-ep-controller-tls controller
tls_secret elastic-ep-rank-tls rank
kubectl create secret generic elastic-ep-etcd-passwords --namespace "$ns" --dry-run=client -o yaml \
  --from-file=root="$dir/passwords/root" --from-file=controller="$dir/passwords/controller"
echo ---
rank_files=()
for rank in "$@"; do
  rank_files+=("--from-file=$rank=$dir/ranks/$rank")
done
kubectl create secret generic elastic-ep-rank-passwords --namespace "$ns" --dry-run=client -o yaml "${rank_files[@]}"
