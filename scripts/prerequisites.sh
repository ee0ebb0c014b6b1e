# Sourced by scripts/demo and scripts/test: make sure what they need is
# installed — PostgreSQL's server binaries (initdb, pg_ctl) and, for the
# tests, Python with venv and promtool — getting it with apt-get when it is
# missing and that is possible, explaining what to do when it is not.

# apt_install PACKAGE...: install Debian packages, as root or through sudo.
apt_install() {
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "error: cannot install $*: not root and no sudo. Install it yourself." >&2
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: apt-get is not available. Install $* with your package manager." >&2
        return 1
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

postgres_binaries_present() {
    command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1 && return 0
    for dir in /usr/lib/postgresql/*/bin; do
        [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && return 0
    done
    return 1
}

ensure_postgres_binaries() {
    postgres_binaries_present && return 0
    echo "PostgreSQL server binaries (initdb, pg_ctl) are missing; installing them with apt-get..." >&2
    if ! apt_install postgresql; then
        echo "error: could not install PostgreSQL. Install it yourself (Debian: apt-get install postgresql)" >&2
        echo "       or set DATABASE_URL to an existing server." >&2
        return 1
    fi
    postgres_binaries_present || {
        echo "error: postgresql was installed but initdb/pg_ctl are still not found." >&2
        return 1
    }
}

# ensure_promtool: Prometheus' promtool, which checks the ledger's /metrics
# in the tests. When it is missing, it is taken out of Debian's prometheus
# package into target/promtool (nothing is installed, no service started)
# and put on PATH.
ensure_promtool() {
    command -v promtool >/dev/null 2>&1 && return 0
    local dir="$PWD/target/promtool"
    if [ ! -x "$dir/usr/bin/promtool" ]; then
        echo "promtool is missing; taking it out of Debian's prometheus package into $dir..." >&2
        local sudo=""
        if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
        rm -rf "$dir" && mkdir -p "$dir/deb" &&
            $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null &&
            (cd "$dir/deb" && apt-get download -q prometheus 2>/dev/null) &&
            dpkg-deb -x "$dir"/deb/prometheus_*.deb "$dir" &&
            rm -rf "$dir/deb" || {
            echo "error: could not get promtool (Debian: apt-get install prometheus)." >&2
            return 1
        }
    fi
    export PATH="$dir/usr/bin:$PATH"
}

# ensure_python_venv DIR REQUIREMENTS: a virtual environment in DIR holding
# the pinned REQUIREMENTS (reused while REQUIREMENTS is unchanged).
ensure_python_venv() {
    local venv="$1" requirements="$2"
    if ! python3 -m venv --help >/dev/null 2>&1; then
        echo "Python 3 with venv is missing; installing it with apt-get..." >&2
        apt_install python3 python3-venv || return 1
    fi
    if [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$venv/requirements.txt"; then
        return 0
    fi
    rm -rf "$venv"
    python3 -m venv "$venv" &&
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" &&
        cp "$requirements" "$venv/requirements.txt"
}
