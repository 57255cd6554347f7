# shellcheck shell=bash
# Shared helpers for scripts/demo and scripts/test. Source it; do not run it.
# Works on a fresh Debian machine as root (CI) or as a user with sudo.

# How long apt-get waits for dpkg's lock held by another apt run (seconds).
APT_LOCK_WAIT_SECONDS="${APT_LOCK_WAIT_SECONDS:-600}"

# Print a step the way a reader of the output can follow it.
step() {
    printf '\n==> %s\n' "$*" >&2
}

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Run a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root for: $* (run as root, or install sudo)"
    fi
}

# True when the Debian package is installed.
deb_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# Install the Debian packages that are missing; apt-get update only when something is.
ensure_debian_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        deb_installed "$pkg" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 ||
        die "missing packages ${missing[*]} and no apt-get: install them by hand"
    step "installing Debian packages: ${missing[*]}"
    # apt's output goes to stderr: callers may capture stdout (python_for_venv).
    # Wait for dpkg's lock (another apt run, unattended-upgrades) instead of failing.
    local lock_wait=(-o "DPkg::Lock::Timeout=$APT_LOCK_WAIT_SECONDS")
    as_root env DEBIAN_FRONTEND=noninteractive apt-get "${lock_wait[@]}" update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get "${lock_wait[@]}" install -y -qq --no-install-recommends "${missing[@]}" </dev/null >&2
}

# The interpreter used to create .venv: $PYTHON, else python3 on PATH.
python_for_venv() {
    local py="${PYTHON:-python3}"
    if ! command -v "$py" >/dev/null 2>&1; then
        ensure_debian_packages python3 python3-venv
    fi
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$py is $("$py" --version 2>&1); popproxy needs Python 3.11 or newer (set PYTHON=...)"
    # Debian ships ensurepip (which venv needs) in python3-venv, not with python3.
    if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        ensure_debian_packages python3-venv
    fi
    printf '%s\n' "$py"
}

# Create .venv if it is missing or broken, then `pip install -e "$1"` unless that
# (or the '.[test,postgres]' superset) was installed from the same pyproject.toml already.
ensure_venv() {
    local target="$1" py stamp hash have
    if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys' >/dev/null 2>&1; then
        py="$(python_for_venv)"
        step "creating .venv with $py"
        rm -rf .venv
        "$py" -m venv .venv
    fi
    stamp=.venv/.popproxy-installed
    hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    have="$(cat "$stamp" 2>/dev/null || true)"
    if [ "$have" != "$target $hash" ] && [ "$have" != ".[test,postgres] $hash" ] ||
        ! .venv/bin/python -c 'import popproxy' >/dev/null 2>&1; then
        step "pip install -e '$target'"
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$target" </dev/null
        printf '%s\n' "$target $hash" >"$stamp"
    fi
}

# The PostgreSQL server the state store's tests use (tests/state/state_backends.py):
# exports POPPROXY_TEST_PG_URL. Kept as it is when already set; else the machine's own
# server on 127.0.0.1:5432 (trust auth, database test) when one listens there and
# POPPROXY_TEST_PG_OWN is not 1; else a throwaway cluster of our own (Debian's
# postgresql package, initdb in a temporary directory, a free loopback port, run as
# a non-root user because postgres refuses root), which stop_test_postgres ends.
ensure_test_postgres() {
    if [ -n "${POPPROXY_TEST_PG_URL:-}" ]; then
        return 0
    fi
    if [ "${POPPROXY_TEST_PG_OWN:-0}" != 1 ] && (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
        export POPPROXY_TEST_PG_URL="postgresql://postgres@127.0.0.1:5432/test"
        return 0
    fi
    ensure_debian_packages postgresql
    local bindir port
    bindir="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d | sort -V | tail -n 1)"
    [ -x "$bindir/initdb" ] || die "no initdb under /usr/lib/postgresql after installing postgresql"
    TEST_PG_DIR="$(mktemp -d /tmp/popproxy-pg.XXXXXX)"
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    TEST_PG_RUN=()
    if [ "$(id -u)" -eq 0 ]; then
        # The Debian package made the postgres system user.
        chown postgres: "$TEST_PG_DIR"
        TEST_PG_RUN=(runuser -u postgres --)
    fi
    step "starting a throwaway PostgreSQL on 127.0.0.1:$port in $TEST_PG_DIR"
    "${TEST_PG_RUN[@]}" "$bindir/initdb" -D "$TEST_PG_DIR/data" -U postgres -A trust \
        -E UTF8 --locale=C --no-sync --no-instructions >"$TEST_PG_DIR/initdb.log" 2>&1 ||
        die "initdb failed: $(cat "$TEST_PG_DIR/initdb.log")"
    TEST_PG_CTL="$bindir/pg_ctl"
    # fsync off: the cluster is thrown away with the run.
    "${TEST_PG_RUN[@]}" "$TEST_PG_CTL" -D "$TEST_PG_DIR/data" -l "$TEST_PG_DIR/server.log" -w \
        -t 60 -o "-c listen_addresses=127.0.0.1 -p $port -k $TEST_PG_DIR -c fsync=off" \
        start >/dev/null || die "PostgreSQL did not start: $(cat "$TEST_PG_DIR/server.log")"
    export POPPROXY_TEST_PG_URL="postgresql://postgres@127.0.0.1:$port/postgres"
}

# Stop and remove the cluster ensure_test_postgres started, if it started one.
stop_test_postgres() {
    if [ -n "${TEST_PG_DIR:-}" ] && [ -d "$TEST_PG_DIR" ]; then
        "${TEST_PG_RUN[@]}" "$TEST_PG_CTL" -D "$TEST_PG_DIR/data" -m immediate -w stop \
            >/dev/null 2>&1 || true
        rm -rf "$TEST_PG_DIR"
    fi
}
