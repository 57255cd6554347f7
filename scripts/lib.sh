# shellcheck shell=bash
# Shared helpers for scripts/demo and scripts/test. Source it; do not run it.
# Works on a fresh Debian machine as root (CI) or as a user with sudo.

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
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >&2
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
# (or the '.[test]' superset) was installed from the same pyproject.toml already.
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
    if [ "$have" != "$target $hash" ] && [ "$have" != ".[test] $hash" ] ||
        ! .venv/bin/python -c 'import popproxy' >/dev/null 2>&1; then
        step "pip install -e '$target'"
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$target" </dev/null
        printf '%s\n' "$target $hash" >"$stamp"
    fi
}
