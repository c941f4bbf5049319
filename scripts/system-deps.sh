#!/bin/sh
# The Debian/Ubuntu packages `make test` needs, and nothing else (`make flows` needs only
# spamassassin and spamd, for the deliverability flows' spam check):
#
#   dovecot-imapd dovecot-lmtpd   a private Dovecot for --mailbox=imap and the IMAP backend tests
#   postfix                       a private Postfix in front of it (used when running as root)
#   chromium                      tests/test_reports_browser.py renders both reports headless;
#                                 --mailproof-render draws each awaited email to PNG
#   spamassassin spamd            the spam check's private spamd (mailproof/servers/spamd.py;
#                                 on Debian 12 the daemon is its own package, spamd)
#   nodejs npm                    Allure 3 (an npm package) builds QA's single-file report
#
#   sh scripts/system-deps.sh           install what is missing (as root), or, when not root,
#                                       print the command to run and exit 1
#   sh scripts/system-deps.sh --check   only report what is there and what is missing (exit 1 if any)
#   sh scripts/system-deps.sh --flows   the same for what `make flows` needs only (spamassassin, spamd)
#
# Each package is detected by the binary the code looks for: `dovecot` on PATH or in /usr/sbin,
# /sbin (mailproof/servers/dovecot.py) with its imap and lmtp helpers in /usr/lib/dovecot;
# /usr/sbin/postfix (mailproof/servers/postfix.py); `chromium` on PATH (tests/test_reports_browser.py);
# `spamd` on PATH or in /usr/sbin and SpamAssassin's rules in /usr/share/spamassassin
# (mailproof/servers/spamd.py);
# `node` and `npm` on PATH (mailproof/report/allure_build.py).
#
# As root: Postfix is preseeded "No configuration", and a temporary /usr/sbin/policy-rc.d (exit
# 101) keeps the packages from starting system daemons; the tests run private instances. The
# policy-rc.d is removed afterwards only if this script created it.
set -eu

PRESEED='postfix postfix/main_mailer_type select No configuration'
POLICY=/usr/sbin/policy-rc.d

have() { command -v "$1" >/dev/null 2>&1; }
have_dovecot() { have dovecot || [ -x /usr/sbin/dovecot ] || [ -x /sbin/dovecot ]; }

# "package|what it is detected by|test" lines; the test is a shell expression.
checks() {
    echo 'spamassassin|/usr/share/spamassassin rules|[ -f /usr/share/spamassassin/10_default_prefs.cf ]'
    echo 'spamd|spamd, /usr/sbin/spamd|have spamd || [ -x /usr/sbin/spamd ]'
    [ "$scope" = flows ] && return 0  # the rest only make test needs
    echo 'dovecot-imapd|dovecot, /usr/lib/dovecot/imap|have_dovecot && [ -x /usr/lib/dovecot/imap ]'
    echo 'dovecot-lmtpd|dovecot, /usr/lib/dovecot/lmtp|have_dovecot && [ -x /usr/lib/dovecot/lmtp ]'
    echo 'postfix|/usr/sbin/postfix|[ -x /usr/sbin/postfix ]'
    echo 'chromium|chromium on PATH|have chromium'
    echo 'nodejs|node on PATH|have node'
    echo 'npm|npm on PATH|have npm'
}

# Prints the missing packages, space separated; with "report", also one line per package on fd 3.
missing_packages() {
    missing=""
    while IFS='|' read -r package found_by test; do
        if eval "$test"; then
            state=ok
        else
            state=missing
            missing="$missing $package"
        fi
        if [ "${1:-}" = report ]; then
            printf '  %-8s %-14s (%s)\n' "$state" "$package" "$found_by" >&3
        fi
    done <<CHECKS
$(checks)
CHECKS
    echo "${missing# }"
}

contains() { case " $1 " in *" $2 "*) return 0 ;; esac; return 1; }

usage() { echo "usage: $0 [--flows] [--check]" >&2; exit 2; }

mode=install
scope=test
for arg in "$@"; do
    case "$arg" in
        --check) mode=check ;;
        --flows) scope=flows ;;  # only what make flows needs: spamassassin and spamd
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) usage ;;
    esac
done
target="make $scope"

if [ "$mode" = check ]; then
    echo "system-deps: packages $target needs (make flows needs only spamassassin and spamd):"
    exec 3>&1
    missing=$(missing_packages report)
    if [ -n "$missing" ]; then
        echo "system-deps: missing: $missing (to install them: sudo sh $0)"
        exit 1
    fi
    echo "system-deps: all present"
    exit 0
fi

missing=$(missing_packages)
if [ -z "$missing" ]; then
    if [ "$scope" = flows ]; then
        echo "system-deps: SpamAssassin (spamd) is installed"
    else
        echo "system-deps: Dovecot, Postfix, Chromium, SpamAssassin, Node.js and npm are installed"
    fi
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    {
        echo "system-deps: $target needs these Debian/Ubuntu packages, which are missing: $missing"
        echo "Install them (as root), then run $target again:"
        echo
        if contains "$missing" postfix; then
            echo "  echo '$PRESEED' | sudo debconf-set-selections"
        fi
        echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends $missing"
        echo
        echo "or run this script as root: sudo sh $0 $*"
        echo "(it does the same and keeps the packages from starting system daemons)."
        echo "make flows needs only spamassassin and spamd (the deliverability flows score spam)."
    } >&2
    exit 1
fi

if ! have apt-get; then
    echo "system-deps: missing: $missing; there is no apt-get here: install the equivalents" \
         "(Dovecot with IMAP and LMTP, Postfix, Chromium, SpamAssassin's spamd, Node.js and npm) by hand" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "system-deps: installing $missing"
apt-get update -q

unavailable=""
for package in $missing; do
    candidate=$(apt-cache policy "$package" 2>/dev/null | sed -n 's/^ *Candidate: *//p')
    case "$candidate" in ""|"(none)") unavailable="$unavailable $package" ;; esac
done
if [ -n "$unavailable" ]; then
    echo "system-deps: apt has no installable version of:$unavailable" >&2
    if contains "$unavailable" chromium; then
        echo "  (where Chromium comes only as a snap, as on Ubuntu: snap install chromium, then run again)" >&2
    fi
    exit 1
fi

if contains "$missing" postfix; then
    echo "$PRESEED" | debconf-set-selections
fi

created_policy=0
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$POLICY"; fi; }
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$POLICY"
    chmod 755 "$POLICY"
    created_policy=1
fi

# shellcheck disable=SC2086  # $missing is a list of package names
apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 $missing

still=$(missing_packages)
if [ -n "$still" ]; then
    echo "system-deps: still missing after apt-get install: $still" >&2
    exit 1
fi
echo "system-deps: installed $missing"
