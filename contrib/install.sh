#!/bin/sh
# Installs a built jabberd-rs as a system service: the layout of docs/install.md.
#
#   cargo build --release && sudo contrib/install.sh
#   contrib/install.sh --destdir /tmp/stage      # into a staging directory, as any user
#
# Idempotent: run it again to upgrade.  Executables, the supervisor, the systemd units
# and the documentation are replaced; a file in /etc/jabberd is never overwritten (a
# shipped file that differs from the installed one is put beside it as FILE.new).
# Without --destdir it must run as root: it creates the system user and group jabberd,
# gives the directories their owners and runs `systemctl daemon-reload`; it enables and
# starts nothing.  With --destdir it does neither (no user, no chown, no systemctl).
set -eu

usage() {
    cat <<EOF
usage: contrib/install.sh [--prefix DIR] [--destdir DIR] [--bin-dir DIR] [--unit-dir DIR]

  --prefix DIR    where programs go: DIR/lib/jabberd, DIR/bin/jabberctl,
                  DIR/share/doc/jabberd (default /usr/local)
  --destdir DIR   stage everything under DIR (paths inside the files stay as without it)
  --bin-dir DIR   the built executables (default target/release of this repository)
  --unit-dir DIR  systemd units (default /etc/systemd/system)
EOF
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/usr/local
DESTDIR=
BIN_DIR=$ROOT/target/release
UNIT_DIR=/etc/systemd/system

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --destdir) DESTDIR=${2:?--destdir needs a directory}; shift 2 ;;
        --destdir=*) DESTDIR=${1#*=}; shift ;;
        --bin-dir) BIN_DIR=${2:?--bin-dir needs a directory}; shift 2 ;;
        --bin-dir=*) BIN_DIR=${1#*=}; shift ;;
        --unit-dir) UNIT_DIR=${2:?--unit-dir needs a directory}; shift 2 ;;
        --unit-dir=*) UNIT_DIR=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
case $PREFIX in /*) ;; *) echo "install.sh: --prefix must be absolute" >&2; exit 2 ;; esac
case $UNIT_DIR in /*) ;; *) echo "install.sh: --unit-dir must be absolute" >&2; exit 2 ;; esac
PREFIX=${PREFIX%/}
if [ -n "$DESTDIR" ]; then
    mkdir -p "$DESTDIR"
    DESTDIR=$(cd "$DESTDIR" && pwd)
fi

# The layout (docs/install.md).
USER_NAME=jabberd
LIB_DIR=$PREFIX/lib/jabberd
ETC_DIR=/etc/jabberd
STATE_DIR=/var/lib/jabberd
LOG_DIR=/var/log/jabberd
RUN_DIR=/run/jabberd
DOC_DIR=$PREFIX/share/doc/jabberd
PROGRAMS="router logd xdb-file xdb-pg sm muc upload proxy65 c2s s2s jabberctl"

say() { echo "install.sh: $*"; }

missing=
for p in $PROGRAMS; do
    [ -x "$BIN_DIR/$p" ] || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "install.sh: missing from $BIN_DIR:$missing (build first: cargo build --release)" >&2
    exit 1
fi

if [ -z "$DESTDIR" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install.sh: run as root, or stage with --destdir DIR" >&2
        exit 1
    fi
    if ! getent group "$USER_NAME" >/dev/null; then
        groupadd --system "$USER_NAME"
        say "created group $USER_NAME"
    fi
    if ! getent passwd "$USER_NAME" >/dev/null; then
        useradd --system --gid "$USER_NAME" --home-dir "$STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "jabberd-rs XMPP server" "$USER_NAME"
        say "created user $USER_NAME"
    fi
fi

# owner USER:GROUP PATH: only for a real install.
owner() {
    [ -n "$DESTDIR" ] || chown "$1" "$2"
}

# dir MODE USER:GROUP PATH
dir() {
    install -d -m "$1" "$DESTDIR$3"
    chmod "$1" "$DESTDIR$3"
    owner "$2" "$3"
}

dir 0755 root:root "$LIB_DIR"
dir 0755 root:root "$LIB_DIR/scripts"
dir 0755 root:root "$PREFIX/bin"
dir 0755 root:root "$DOC_DIR"
dir 0755 root:root "$UNIT_DIR"
dir 0750 "root:$USER_NAME" "$ETC_DIR"
dir 0750 "$USER_NAME:$USER_NAME" "$STATE_DIR"
dir 0750 "$USER_NAME:$USER_NAME" "$STATE_DIR/spool"
dir 0750 "$USER_NAME:$USER_NAME" "$STATE_DIR/certs"
dir 0750 "$USER_NAME:$USER_NAME" "$STATE_DIR/upload"
dir 0750 "$USER_NAME:$USER_NAME" "$LOG_DIR"
dir 0750 "$USER_NAME:$USER_NAME" "$RUN_DIR"

# Executables.  install(1) replaces a file rather than writing into it, so running
# programs keep their old copy until they are restarted.
for p in $PROGRAMS; do
    install -m 0755 "$BIN_DIR/$p" "$DESTDIR$LIB_DIR/$p"
done
say "programs in $DESTDIR$LIB_DIR"

# The supervisor, for jabberd.service.  It takes the parent of its scripts/ directory
# as its base: there, etc/ leads to the configuration, so `jabberd status` needs no -f.
install -m 0755 "$ROOT/scripts/jabberd" "$DESTDIR$LIB_DIR/scripts/jabberd"
ln -sfn "$ETC_DIR" "$DESTDIR$LIB_DIR/etc"

# jabberctl with the installed configuration unless given another.
cat >"$DESTDIR$PREFIX/bin/jabberctl.tmp" <<EOF
#!/bin/sh
# jabberctl with $ETC_DIR/jabberctl.xml (docs/install.md), unless -c FILE is given.
for arg in "\$@"; do
    case \$arg in
        -c|--config|--config=*) exec "$LIB_DIR/jabberctl" "\$@" ;;
    esac
done
exec "$LIB_DIR/jabberctl" -c "$ETC_DIR/jabberctl.xml" "\$@"
EOF
chmod 0755 "$DESTDIR$PREFIX/bin/jabberctl.tmp"
mv -f "$DESTDIR$PREFIX/bin/jabberctl.tmp" "$DESTDIR$PREFIX/bin/jabberctl"

# Configuration: the shipped files with their relative paths (relative to the
# repository, where the supervisor runs everything) made absolute.
rewrite_config() {
    sed -e '1{/^<?xml/!q1}' \
        -e '1a\
<!-- Installed by contrib/install.sh: paths made absolute for the layout of docs/install.md. -->' \
        -e "s#\\(^\\|[^A-Za-z0-9_./-]\\)etc/#\\1$ETC_DIR/#g" \
        -e "s#\\(^\\|[^A-Za-z0-9_./-]\\)var/#\\1$STATE_DIR/#g" \
        -e "s#\\(^\\|[^A-Za-z0-9_./-]\\)log/#\\1$LOG_DIR/#g" \
        -e "s#\\(^\\|[^A-Za-z0-9_./-]\\)run/#\\1$RUN_DIR/#g" \
        -e "s#/etc/jabberd-rs/#$ETC_DIR/#g" \
        -e "s#<bin-dir>[^<]*</bin-dir>#<bin-dir>$LIB_DIR</bin-dir>#" \
        -e "s#<run-dir>[^<]*</run-dir>#<run-dir>$RUN_DIR</run-dir>#" \
        -e "s#<log-dir>[^<]*</log-dir>#<log-dir>$LOG_DIR</log-dir>#" \
        "$1"
}

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
for src in "$ROOT"/etc/*.xml; do
    name=$(basename "$src")
    dest=$DESTDIR$ETC_DIR/$name
    if ! rewrite_config "$src" >"$tmp"; then
        echo "install.sh: $src does not start with an XML declaration" >&2
        exit 1
    fi
    if [ ! -e "$dest" ]; then
        install -m 0640 "$tmp" "$dest"
        owner "root:$USER_NAME" "$ETC_DIR/$name"
        say "installed $dest"
    elif ! cmp -s "$tmp" "$dest"; then
        if ! cmp -s "$tmp" "$dest.new"; then
            install -m 0640 "$tmp" "$dest.new"
            owner "root:$USER_NAME" "$ETC_DIR/$name.new"
        fi
        say "kept $dest; the shipped version is $dest.new"
    fi
done

# systemd units, with this prefix.  On this machine's systemd 254 or later (not known
# for a staging directory), the delay between restarts grows while a program keeps failing.
restart_steps=
if [ -z "$DESTDIR" ] &&
    version=$(systemctl --version 2>/dev/null | sed -n '1s/^systemd \([0-9]*\).*/\1/p') &&
    [ -n "$version" ] && [ "$version" -ge 254 ]; then
    restart_steps=yes
fi
for src in "$ROOT"/contrib/systemd/*.service "$ROOT"/contrib/systemd/*.target; do
    sed -e "s#/usr/local/#$PREFIX/#g" \
        -e "${restart_steps:+s/^#\\(RestartSteps=\\|RestartMaxDelaySec=\\)/\\1/}" \
        "$src" >"$tmp"
    install -m 0644 "$tmp" "$DESTDIR$UNIT_DIR/$(basename "$src")"
done
say "systemd units in $DESTDIR$UNIT_DIR"

for doc in "$ROOT"/docs/*.md; do
    install -m 0644 "$doc" "$DESTDIR$DOC_DIR/$(basename "$doc")"
done

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload
    say "done; start with: systemctl enable --now jabberd.target (docs/install.md)"
else
    say "done"
fi
