#!/usr/bin/env bash
# Vagrant provisioner for the db VM: Docker from Debian's packages, then PostgreSQL 15
# and PgBouncers pgb1..pgb3 from docker/docker-compose.yml (host ports 6432-6434).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq docker.io docker-compose rsync >/dev/null
systemctl enable --now docker

# A copy outside the synced folder, so `vagrant rsync` cannot change a running stack.
install -d -m 0755 /opt/pglb
rsync -a --delete /vagrant/docker/ /opt/pglb/docker/
cd /opt/pglb/docker
# Debian 12 ships Compose v1 (docker-compose); `docker compose` is the v2 plugin.
if docker compose version >/dev/null 2>&1; then
  docker compose up -d
else
  docker-compose up -d
fi
docker ps --format '{{.Names}}\t{{.Status}}\t{{.Ports}}'
