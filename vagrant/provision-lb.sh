#!/usr/bin/env bash
# Vagrant provisioner for a load balancer VM: provision-lb.sh lb1|lb2
# Installs keepalived, curl and the pglb .deb built on the host (`cargo deb`, found in
# /vagrant/target/debian/), the VM config vagrant/pglb.toml, keepalived's config for
# this node and its two scripts; then enables and starts pglb and keepalived.
set -euo pipefail
node="${1:-}"
case "$node" in
  lb1) ip=192.168.1.10 peer=lb2 peer_ip=192.168.1.11 ;;
  lb2) ip=192.168.1.11 peer=lb1 peer_ip=192.168.1.10 ;;
  *)
    echo "usage: $0 lb1|lb2" >&2
    exit 2
    ;;
esac
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq keepalived curl >/dev/null

# The package: the newest .deb from the host's target/debian.
deb=$(ls -t /vagrant/target/debian/pglb_*.deb 2>/dev/null | head -n 1 || true)
if [ -z "$deb" ]; then
  echo "no pglb .deb in /vagrant/target/debian: run 'cargo deb' on the host, then 'vagrant rsync'" >&2
  exit 1
fi
# /etc/pglb/pglb.toml is not a conffile: upgrades keep the file installed below.
apt-get install -y -qq "$deb" >/dev/null

# pglb's config (it holds passwords: root:pglb 0640), validated before use.
# The pair shares operator actions (drain, maint, weight): this node's name and its
# peer's stats port are appended to the shared file.
{
  sed -e "s/^node = \"lb1\"/node = \"$node\"/" /vagrant/vagrant/pglb.toml
  printf '\n[[peer]]\nname = "%s"\nurl = "http://%s:8404"\n' "$peer" "$peer_ip"
} >/etc/pglb/pglb.toml.new
install -m 0640 -o root -g pglb /etc/pglb/pglb.toml.new /etc/pglb/pglb.toml
rm -f /etc/pglb/pglb.toml.new
/usr/bin/pglb --config /etc/pglb/pglb.toml --check

# keepalived's scripts: root-owned and not writable by others (enable_script_security).
install -d -m 0755 -o root -g root /usr/local/lib/pglb
install -m 0755 -o root -g root /vagrant/deploy/keepalived/check-pglb /usr/local/lib/pglb/check-pglb
install -m 0755 -o root -g root /vagrant/deploy/keepalived/keepalived-notify /usr/local/lib/pglb/keepalived-notify

# keepalived's config names eth1; use whatever interface really holds this node's address.
iface=$(ip -o -4 addr show | awk -v ip="$ip" '{ split($4, a, "/"); if (a[1] == ip) { print $2; exit } }')
if [ -z "$iface" ]; then
  echo "no interface has $ip" >&2
  exit 1
fi
sed -e "s/\beth1\b/$iface/g" "/vagrant/deploy/keepalived/keepalived-$node.conf" >/etc/keepalived/keepalived.conf.new
keepalived -t -f /etc/keepalived/keepalived.conf.new
mv /etc/keepalived/keepalived.conf.new /etc/keepalived/keepalived.conf

systemctl daemon-reload
systemctl enable pglb keepalived
systemctl restart pglb
systemctl restart keepalived
systemctl --no-pager --lines=0 status pglb keepalived
curl -fsS -m 2 "http://127.0.0.1:8404/health?servers" || echo "pglb has no PgBouncer UP yet (are the db VM's PgBouncers up?)"
