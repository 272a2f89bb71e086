#!/usr/bin/env bash
# Deployment test: builds the images from the repository's Dockerfile (a prebuilt binary copied in, the
# base made by mmdebstrap from Debian's packages: no container registry is needed), brings
# docker-compose.yml up with podman-compose (PostgreSQL, server, agent), runs the sample work through it
# to success, takes everything down again (also on failure), and validates infra/k8s/*.yaml against the
# Kubernetes schemas.
#
#   infra/test/deploy.sh target/debug/orchestrator
#
# Installs what is missing: podman, mmdebstrap, runc (apt-get, as root), and a venv with podman-compose
# and kubernetes-validate. Environment:
#   DEPLOY_TEST_CACHE     venv, base rootfs tarball, containers.conf
#                         (default ${XDG_CACHE_HOME:-~/.cache}/orchestrator-deploy-test)
#   DEPLOY_TEST_ROOTFS_MAX_AGE_DAYS  rebuild the cached rootfs when older (default 14)
#   DEPLOY_TEST_PORT      host port published on 127.0.0.1 (default 18480)
#   DEPLOY_TEST_TIMEOUT   seconds the sample work may take once seeded (default 180)
#   DEPLOY_TEST_K8S_VERSION  Kubernetes schema version (default 1.30.0)
#   DEPLOY_TEST_KEEP=1    leave the stack running (no cleanup) to look at it
set -euo pipefail

usage() { echo "usage: $0 PATH/TO/orchestrator   (a Linux x86-64 binary, glibc <= 2.36)" >&2; exit 2; }
[ $# -eq 1 ] || usage
[ -x "$1" ] || { echo "deploy test: $1 is not an executable file" >&2; usage; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
binary=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
cache=${DEPLOY_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orchestrator-deploy-test}
port=${DEPLOY_TEST_PORT:-18480}
timeout=${DEPLOY_TEST_TIMEOUT:-180}
k8s_version=${DEPLOY_TEST_K8S_VERSION:-1.30.0}
max_age=${DEPLOY_TEST_ROOTFS_MAX_AGE_DAYS:-14}
project=orchestrator-deploy-test
prefix=localhost/$project
base_image=$prefix/debian-base:bookworm
server_image=$prefix/orchestrator:test
postgres_image=$prefix/postgres:15
pins=(podman-compose==1.6.0 kubernetes-validate==1.37.0)

# --- timings -------------------------------------------------------------------------------------
now() { date +%s.%N; }
t_start=$(now)
t_phase=$t_start
timings=()
phase() { # phase NAME: ends the running phase (printing its duration), then announces NAME
  local t
  t=$(now)
  if [ -n "${phase_name:-}" ]; then
    local d
    d=$(awk -v a="$t_phase" -v b="$t" 'BEGIN { printf "%.1f", b - a }')
    timings+=("$(printf '%6ss  %s' "$d" "$phase_name")")
    echo "deploy test: ${phase_name}: ${d}s"
  fi
  t_phase=$t
  phase_name=${1:-}
  [ -z "$phase_name" ] || echo "deploy test: == $phase_name"
}
summary() {
  echo "deploy test: timings"
  local l
  for l in "${timings[@]}"; do echo "  $l"; done
  awk -v a="$t_start" -v b="$(now)" 'BEGIN { printf "  %5.1fs  total\n", b - a }'
}

# --- tools ---------------------------------------------------------------------------------------
phase "tools"
missing=()
for tool in podman mmdebstrap runc; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "deploy test: missing ${missing[*]}; install them (apt-get install podman mmdebstrap runc) or run as root" >&2
    exit 1
  fi
  echo "deploy test: installing ${missing[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman mmdebstrap runc >/dev/null
fi
mkdir -p "$cache"
venv=$cache/venv
if [ "$(cat "$venv/.pins" 2>/dev/null)" != "${pins[*]}" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
  echo "${pins[*]}" >"$venv/.pins"
fi
py=$venv/bin/python
compose=("$venv/bin/podman-compose" -p "$project" -f "$repo/docker-compose.yml")

# Two settings this kind of machine needs: ulimits that a root without CAP_SYS_RESOURCE may set, and
# runc with cgroupfs (crun refuses the hybrid cgroup layout).
cat >"$cache/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$cache/containers.conf
podman --version

# --- Kubernetes manifests ------------------------------------------------------------------------
phase "validate infra/k8s against Kubernetes $k8s_version"
"$venv/bin/kubernetes-validate" --strict -k "$k8s_version" "$repo"/infra/k8s/*.yaml

# --- cleanup (before, to be idempotent after an interrupted run; and after, even on failure) ------
# The compose file refers to these; podman-compose reads them (and nothing from a .env beside it wins).
export ORCHESTRATOR_IMAGE=$server_image POSTGRES_IMAGE=$postgres_image BASE_IMAGE=$base_image
export ORCH_PUBLISH=127.0.0.1:$port
random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }
POSTGRES_PASSWORD=$(random_hex 16) ORCH_ADMIN_TOKEN=$(random_hex 16) ORCH_OPERATOR_TOKEN=$(random_hex 16)
ORCH_AGENT_TOKEN=$(random_hex 16) ORCH_SECRET_KEY=$(random_hex 32)
export POSTGRES_PASSWORD ORCH_ADMIN_TOKEN ORCH_OPERATOR_TOKEN ORCH_AGENT_TOKEN ORCH_SECRET_KEY
export RUST_LOG=info

teardown() { # removes whatever this test made (containers, volumes, network, images); never fails
  local ids
  "${compose[@]}" down -v -t 10 >/dev/null 2>&1 || true
  ids=$(podman ps -aq --filter "label=io.podman.compose.project=$project" 2>/dev/null) || true
  [ -z "$ids" ] || podman rm -f -v $ids >/dev/null 2>&1 || true
  ids=$(podman volume ls -q --filter "label=io.podman.compose.project=$project" 2>/dev/null) || true
  [ -z "$ids" ] || podman volume rm -f $ids >/dev/null 2>&1 || true
  ids=$(podman network ls -q --filter "label=io.podman.compose.project=$project" 2>/dev/null) || true
  [ -z "$ids" ] || podman network rm -f $ids >/dev/null 2>&1 || true
  podman rmi -f "$server_image" "$postgres_image" "$base_image" >/dev/null 2>&1 || true
}
on_exit() {
  local status=$? left
  set +e
  rm -rf "$stage"
  if [ "${DEPLOY_TEST_KEEP:-}" = 1 ]; then
    echo "deploy test: DEPLOY_TEST_KEEP=1: the stack stays up on http://127.0.0.1:$port (the next run removes it)"
  else
    phase "take everything down"
    teardown
    left=$(podman ps -aq --filter "label=io.podman.compose.project=$project")$(podman images -q --filter "reference=$prefix/*")
    [ -z "$left" ] || echo "deploy test: warning: left behind: $left" >&2
  fi
  phase
  summary
  if [ "$status" = 0 ]; then echo "deploy test: PASSED"; else echo "deploy test: FAILED (exit $status)" >&2; fi
  exit "$status"
}
phase "remove what an earlier run left"
teardown
stage=$(mktemp -d)
trap on_exit EXIT
trap 'exit 130' INT TERM

# --- images --------------------------------------------------------------------------------------
phase "base image (mmdebstrap, cached in $cache)"
rootfs=$cache/debian-bookworm-minbase.tar
if [ ! -s "$rootfs" ] || [ -n "$(find "$rootfs" -mtime +"$max_age" 2>/dev/null)" ]; then
  rm -rf "$rootfs" "$cache/rootfs.tmp.tar"
  mmdebstrap --variant=minbase --format=tar --quiet bookworm "$cache/rootfs.tmp.tar"
  mv "$cache/rootfs.tmp.tar" "$rootfs"
else
  echo "deploy test: reusing $rootfs"
fi
podman import --quiet --change 'CMD ["/bin/bash"]' "$rootfs" "$base_image" >/dev/null

phase "build the server image (Dockerfile, target prebuilt) and the PostgreSQL image"
# A context holding only the binary: the repository's target/ may weigh gigabytes.
ln "$binary" "$stage/orchestrator" 2>/dev/null || cp "$binary" "$stage/orchestrator"
# Both at once (each spends most of its time in apt-get); --format docker keeps HEALTHCHECK.
podman build --layers=false --format docker --build-arg BASE="$base_image" -t "$postgres_image" \
  "$repo/infra/postgres" >"$stage/build-postgres.log" 2>&1 &
pg_build=$!
podman build --layers=false --format docker -f "$repo/Dockerfile" --target prebuilt --build-arg BASE="$base_image" \
  --build-arg BINARY=orchestrator -t "$server_image" "$stage" >"$stage/build-server.log" 2>&1 ||
  { tail -n 30 "$stage/build-server.log" >&2; echo "deploy test: building the server image failed" >&2; wait; exit 1; }
wait "$pg_build" ||
  { tail -n 30 "$stage/build-postgres.log" >&2; echo "deploy test: building the PostgreSQL image failed" >&2; exit 1; }
podman run --rm --no-healthcheck "$server_image" --version

# --- the stack -----------------------------------------------------------------------------------
phase "compose up"
up_status=0
"${compose[@]}" up -d --no-build >"$stage/up.log" 2>&1 || up_status=$?
# Without systemd podman cannot schedule healthchecks, and podman-compose ignores `service_healthy` on
# podman < 4.6: leave those lines out.
grep -v -e '^[0-9a-f]\{64\}$' -e 'systemd connection' -e 'condition check' -e 'connect to syslog' "$stage/up.log" || true
container() { podman ps -q --filter "label=io.podman.compose.project=$project" --filter "label=com.docker.compose.service=$1" | head -n1; }
dump_logs() {
  local s
  for s in postgres server agent; do
    echo "---- logs of $s (last 40 lines)"
    podman logs --tail 40 "$(podman ps -aq --filter "label=io.podman.compose.project=$project" \
      --filter "label=com.docker.compose.service=$s" | head -n1)" 2>&1
  done
}
fail() { echo "deploy test: $*" >&2; dump_logs >&2; exit 1; }
[ "$up_status" = 0 ] || fail "podman-compose up failed (exit $up_status)"

phase "wait for /readyz"
url=http://127.0.0.1:$port
deadline=$((SECONDS + 120))
until curl -fsS -o /dev/null "$url/readyz" 2>/dev/null; do
  [ -n "$(podman ps -aq --filter "label=io.podman.compose.project=$project" --filter label=com.docker.compose.service=server)" ] ||
    fail "compose made no server container"
  [ $SECONDS -lt $deadline ] || fail "the server was not ready on $url/readyz within 120 s"
  sleep 0.5
done
curl -fsS "$url/readyz"
echo
server=$(container server)
agent=$(container agent)
[ -n "$agent" ] || fail "the agent container is not running"
# The image's HEALTHCHECK (podman runs it on demand here: there is no systemd to schedule it).
podman healthcheck run "$server" >/dev/null 2>&1 || fail "the server's HEALTHCHECK failed"
echo "HEALTHCHECK of the server: healthy"
code=$(curl -s -o /dev/null -w '%{http_code}' "$url/work-items")
[ "$code" = 401 ] || fail "GET /work-items without a token answered $code, expected 401"

phase "seed and run the sample work"
# Inside the agent's container: `seed` makes the sample git repository in its working directory, which
# the agent must be able to clone.
seeded=$(podman exec -e ORCH_SERVER_URL=http://server:18080 -e ORCH_TOKEN="$ORCH_OPERATOR_TOKEN" "$agent" \
  orchestrator seed --json) || fail "orchestrator seed failed"
project_id=$(printf '%s' "$seeded" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["project_id"])')
echo "seeded project $project_id"
deadline=$((SECONDS + timeout))
last=
while :; do
  states=$(curl -fsS -H "Authorization: Bearer $ORCH_OPERATOR_TOKEN" "$url/work-items?project_id=$project_id" |
    "$py" -c '
import json, sys
v = json.load(sys.stdin)
items = v if isinstance(v, list) else v.get("items", [])
print(" ".join(sorted("%s=%s" % (i["title"].split()[0].lower(), i["state"]) for i in items)))
') || fail "GET /work-items failed"
  [ "$states" = "$last" ] || echo "  $((SECONDS - deadline + timeout))s: $states"
  last=$states
  n=0 ok=0
  for s in $states; do
    n=$((n + 1))
    case ${s#*=} in
      succeeded) ok=$((ok + 1)) ;;
      failed | cancelled | blocked) fail "a sample work item did not succeed: $states" ;;
    esac
  done
  if [ "$n" -eq 3 ] && [ "$ok" -eq 3 ]; then break; fi
  [ $SECONDS -lt $deadline ] || fail "the sample work did not finish within $timeout s: $states"
  sleep 1
done
# The first item's run committed on its branch: its diff is served.
first=$(printf '%s' "$seeded" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["work_items"][0][0])')
run=$(curl -fsS -H "Authorization: Bearer $ORCH_OPERATOR_TOKEN" "$url/work-items/$first/runs" |
  "$py" -c 'import json,sys; v=json.load(sys.stdin); v=v if isinstance(v,list) else v["items"]; print(v[-1]["id"])')
curl -fsS -H "Authorization: Bearer $ORCH_OPERATOR_TOKEN" "$url/runs/$run/diff" | grep -q '^+hello from the sample recipe' ||
  fail "the diff of run $run lacks the sample recipe's greeting"
echo "all 3 sample work items succeeded; run $run's diff has the greeting"
