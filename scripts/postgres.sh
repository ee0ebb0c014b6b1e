# Sourced by scripts/demo and scripts/test: make sure PostgreSQL's server
# binaries (initdb, pg_ctl) are installed, installing them with apt-get when
# they are missing and that is possible, explaining what to do when it is not.

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
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "error: cannot install PostgreSQL: not root and no sudo. Install it yourself" >&2
            echo "       (Debian: apt-get install postgresql) or set DATABASE_URL." >&2
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: apt-get is not available. Install PostgreSQL's server binaries" >&2
        echo "       (initdb, pg_ctl) with your package manager, or set DATABASE_URL." >&2
        return 1
    fi
    if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
           $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; }; then
        echo "error: apt-get could not install postgresql (see above). Install it yourself or set DATABASE_URL." >&2
        return 1
    fi
    postgres_binaries_present || {
        echo "error: postgresql was installed but initdb/pg_ctl are still not found." >&2
        return 1
    }
}
