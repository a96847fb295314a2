#!/usr/bin/env bash
# The image check, on a machine with a Docker engine (make docker-check): build the `cpu` target, then in a
# container, as a non-root user, with a copy of this working tree bind-mounted at /workspace: the doctor,
# the smoke profile's `dvc repro` end to end, and the tests meant for the image. Then check that every file
# in the copy belongs to the calling user (not root) and print image size, build and run times.
#   bash scripts/docker-check.sh
# Environment:
#   IMAGE=semanticmim:cpu-check   tag to build
#   BASE_IMAGE=...                the Dockerfile's default; when it cannot be pulled (no registry reachable),
#                                 a Debian bookworm base is made locally with debootstrap (needs root) and
#                                 the host's extra CA certificates are added to it (never to the repo)
#   DOCKER_NETWORK=host|bridge    network for build and run (default: host when the daemon has no bridge)
#   TORCH_INDEX_URL=...           the cpu target's torch index; default download.pytorch.org/whl/cpu, or
#                                 PyPI's CUDA-bundled torch when that is unreachable (then said so)
#   KEEP=1                        keep the working copy (its path is printed)
set -euo pipefail
cd "$(dirname "$0")/.."
image=${IMAGE:-semanticmim:cpu-check}
local_base=semanticmim-base:bookworm-local
default_base=$(sed -n 's/^ARG BASE_IMAGE=//p' docker/Dockerfile)
base=${BASE_IMAGE:-$default_base}
export DOCKER_BUILDKIT=0  # the legacy builder: BuildKit would try to pull its frontend and cache images

die() { echo "docker-check: $*" >&2; exit 1; }
say() { echo "== $*"; }

docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd, or run where one runs)"
if [ -z "${DOCKER_NETWORK:-}" ]; then
    DOCKER_NETWORK=host
    docker network inspect bridge >/dev/null 2>&1 && DOCKER_NETWORK=bridge
fi

make_local_base() {
    [ "$(id -u)" = 0 ] || die "cannot pull $base, and making a local base with debootstrap needs root"
    command -v debootstrap >/dev/null || die "cannot pull $base; install debootstrap to make a local base"
    local rootfs
    rootfs=$(mktemp -d /tmp/semanticmim-rootfs.XXXXXX)
    say "making $local_base with debootstrap (minbase bookworm + python3)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
        "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/tmp/semanticmim-debootstrap.log 2>&1 ||
        die "debootstrap failed, see /tmp/semanticmim-debootstrap.log"
    # This network intercepts TLS with its own CA: a test-time addition to a throwaway base, never committed.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
    fi
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        -m "local stand-in for $default_base (debootstrap; host CA certificates added)" - "$local_base" >/dev/null
    rm -rf "$rootfs"
}

base_start=$(date +%s)
if ! docker image inspect "$base" >/dev/null 2>&1 && ! timeout 60 docker pull -q "$base" >/dev/null 2>&1; then
    say "$base cannot be pulled: using a locally made base"
    base=$local_base
    docker image inspect "$base" >/dev/null 2>&1 || make_local_base
fi
base_s=$(($(date +%s) - base_start))

if [ -z "${TORCH_INDEX_URL+set}" ]; then
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
    if ! curl -fs --max-time 15 -o /dev/null "$TORCH_INDEX_URL/torch/"; then
        say "$TORCH_INDEX_URL is unreachable: the cpu image gets PyPI's torch (CUDA-bundled, several GB more)"
        TORCH_INDEX_URL=
    fi
fi

# Run as the calling user; a root caller proves nothing about ownership, so it runs as the image's user 1000.
uid=$(id -u) gid=$(id -g)
[ "$uid" = 0 ] && uid=1000 gid=1000

say "building $image (target cpu, base $base, network $DOCKER_NETWORK, uid $uid)"
build_start=$(date +%s)
docker build --network "$DOCKER_NETWORK" -f docker/Dockerfile --target cpu -t "$image" \
    --build-arg BASE_IMAGE="$base" --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
    --build-arg APP_UID="$uid" --build-arg APP_GID="$gid" . >/tmp/semanticmim-docker-build.log 2>&1 ||
    { tail -30 /tmp/semanticmim-docker-build.log; die "build failed, see /tmp/semanticmim-docker-build.log"; }
build_s=$(($(date +%s) - build_start))

# The working tree as it is (tracked and untracked files git does not ignore), not the last commit.
work=$(mktemp -d /tmp/semanticmim-docker-check.XXXXXX)
git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    tar --null -T - -c | tar -x -C "$work"
cp params/smoke.yaml "$work/params.yaml"
chown -R "$uid:$gid" "$work"
chmod 755 "$work"
[ "${KEEP:-}" = 1 ] || trap 'rm -rf "$work"' EXIT

# The README's flags; a daemon whose own locked-memory limit is finite cannot lift a container's.
run_flags=(--ipc=host)
if [ "$(ulimit -Hl)" = unlimited ]; then
    run_flags+=(--ulimit memlock=-1)
else
    say "the locked-memory limit here is $(ulimit -Hl) kB: running without --ulimit memlock=-1"
fi

in_container() {
    docker run --rm --network "$DOCKER_NETWORK" --user "$uid:$gid" "${run_flags[@]}" \
        -e OMP_NUM_THREADS=1 -e GIT_AUTHOR_NAME=check -e GIT_AUTHOR_EMAIL=check@localhost \
        -e GIT_COMMITTER_NAME=check -e GIT_COMMITTER_EMAIL=check@localhost \
        -v "$work:/workspace" --entrypoint bash "$image" -c "$1"
}

status=0
say "in the container: doctor"
# Until the CLI has a `doctor` command, the same checks through the module.
in_container 'if semanticmim doctor --help >/dev/null 2>&1; then exec semanticmim doctor --params params.yaml; fi
    exec python -c "import sys; from pathlib import Path; from stages import doctor as d
c = d.run_checks(Path(\"params.yaml\"), Path(\"requirements.lock\")); print(d.format_report(c)); sys.exit(d.exit_code(c))"' ||
    status=1

say "in the container: dvc repro (smoke profile)"
run_start=$(date +%s)
in_container 'set -e; id; git init -q; git add -A; git commit -qm "smoke profile"; dvc repro; dvc status' \
    >/tmp/semanticmim-docker-repro.log 2>&1 ||
    { tail -40 /tmp/semanticmim-docker-repro.log; echo "docker-check: dvc repro failed" >&2; status=1; }
repro_s=$(($(date +%s) - run_start))
grep -E "^uid=|Running stage|up to date|changed" /tmp/semanticmim-docker-repro.log | head -40 || true

say "in the container: tests for the image"
tests_start=$(date +%s)
# The tests marked `docker` once pyproject.toml registers that marker; the lock, Dockerfile and doctor tests
# always (test_lock.py has an image-only test: nothing installed beyond the lock).
in_container 'set -e
    if pytest --markers | grep -q "^@pytest.mark.docker:"; then pytest -q -p no:cacheprovider -m docker; fi
    pytest -q -p no:cacheprovider tests/test_lock.py tests/test_dockerfile.py tests/test_doctor.py' || status=1
tests_s=$(($(date +%s) - tests_start))

say "ownership of the outputs on the host"
not_ours=$(find "$work" \( ! -uid "$uid" -o ! -gid "$gid" \) -print | head -5)
outputs=$(find "$work/runs" "$work/dvc.lock" -newer "$work/params.yaml" 2>/dev/null | wc -l)
if [ "$outputs" = 0 ]; then
    echo "docker-check: the run left no outputs (runs/, dvc.lock) to check" >&2; status=1
elif [ -n "$not_ours" ]; then
    echo "docker-check: files not owned by $uid:$gid:" >&2; echo "$not_ours" >&2; status=1
else
    echo "all $(find "$work" | wc -l) files in the copy belong to $uid:$gid, $outputs of them written by the run"
fi

size=$(docker image inspect -f '{{.Size}}' "$image")
torch=$(docker run --rm --entrypoint python "$image" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo '?')
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
echo
echo "image        $image: $((size / 1000000)) MB (torch $torch, base $base)"
echo "base         ${base_s} s"
echo "build        ${build_s} s"
echo "dvc repro    ${repro_s} s (smoke profile, one container)"
echo "tests        ${tests_s} s"
echo "host         $(nproc) x ${cpu:-unknown CPU}"
[ "${KEEP:-}" = 1 ] && echo "copy kept at $work"
[ "$status" = 0 ] && echo "docker-check: ok" || echo "docker-check: FAILED" >&2
exit "$status"
