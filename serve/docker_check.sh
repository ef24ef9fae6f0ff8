#!/usr/bin/env bash
# Build serve/Dockerfile, run the image, wait for its HEALTHCHECK, and check it end to end:
# /readyz, GET /v1/models and POST /v1/models/onset/predict with a key, 401 without one, the process
# runs as uid 10001, the training stack (masml, xgboost, sklearn, shap, mlflow) is NOT in the image,
# and the image size. Exits non-zero, naming what failed, on any failure; always removes its container.
#
# Needs a running Docker engine, curl and python3 on the host, and BuildKit (buildx, or a 20.10-22.x
# CLI): the build reads serve/Dockerfile.dockerignore, which the legacy builder ignores.
# Run from anywhere:  bash serve/docker_check.sh
# Env (all optional):
#   IMAGE_TAG       image to build and run                       (default masml-serve)
#   PORT            host port published on 127.0.0.1             (default 18000)
#   DOCKER          docker CLI to use                            (default docker)
#   SKIP_BUILD=1    check an existing IMAGE_TAG without building it
#   BUILD_ARGS      extra `docker build` arguments, word-split   (e.g. "--network host --no-cache")
#   RUN_ARGS        extra `docker run` arguments, word-split
#   HEALTH_TIMEOUT  seconds to wait for "healthy"                (default 120)
#   EXPECT_MODELS   tasks /readyz must list                      (default "icu il1_benefit onset")
#   KEEP=1          leave the container running afterwards (it is still named in the output)
set -euo pipefail

IMAGE_TAG=${IMAGE_TAG:-masml-serve}
PORT=${PORT:-18000}
DOCKER=${DOCKER:-docker}
SKIP_BUILD=${SKIP_BUILD:-0}
BUILD_ARGS=${BUILD_ARGS:-}
RUN_ARGS=${RUN_ARGS:-}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-120}
EXPECT_MODELS=${EXPECT_MODELS:-icu il1_benefit onset}
KEEP=${KEEP:-0}
FORBIDDEN_MODULES="masml xgboost sklearn shap mlflow"
REQUIRED_MODULES="onnxruntime numpy starlette uvicorn msgspec serve"
EXPECTED_UID=10001
read -r -a expect_models <<< "$EXPECT_MODELS"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rand() { od -An -N8 -tx1 /dev/urandom | tr -d ' \n'; }
USER_KEY=check-user-$(rand)
ADMIN_KEY=check-admin-$(rand)
NAME=masml-serve-check-$$
BASE=http://127.0.0.1:$PORT
SCRATCH=$(mktemp -d /tmp/masml-docker-check.XXXXXX)
PREDICT_BODY='{"patients": [{"patient_id": "a", "age_years": 9, "sex": "F", "trigger": "sjia", "ferritin": 8000, "platelets": 90}]}'

log() { printf '[docker-check] %s\n' "$*"; }
die() { printf '[docker-check] ERROR: %s\n' "$*" >&2; exit 1; }
passed=0; failed=0; failures=()
ok()   { passed=$((passed + 1)); printf '[docker-check] PASS %s\n' "$1"; }
bad()  { failed=$((failed + 1)); failures+=("$1"); printf '[docker-check] FAIL %s\n' "$1" >&2; [[ -z ${2:-} ]] || printf '%s\n' "$2" | sed 's/^/    /' >&2; }

started=0
cleanup() {
    rc=$?
    if [[ $started == 1 ]]; then
        if [[ $rc != 0 || $failed != 0 ]]; then
            log "container log (last 40 lines):"; "$DOCKER" logs --tail 40 "$NAME" 2>&1 | sed 's/^/    /' || true
        fi
        if [[ $KEEP == 1 ]]; then log "KEEP=1: container $NAME left running on $BASE"
        elif "$DOCKER" rm -f "$NAME" >/dev/null 2>&1; then log "removed container $NAME"
        else log "could not remove container $NAME"; fi
    fi
    rm -rf "$SCRATCH"
}
trap cleanup EXIT

# ---- preflight --------------------------------------------------------------------------------
for tool in "$DOCKER" curl python3; do command -v "$tool" >/dev/null || die "$tool not found"; done
"$DOCKER" info >/dev/null 2>&1 || die "no Docker engine answers ('$DOCKER info' failed)"
if [[ $SKIP_BUILD != 1 ]]; then
    export DOCKER_BUILDKIT=1
    client=$("$DOCKER" version --format '{{.Client.Version}}' 2>/dev/null || echo 0)
    if ! "$DOCKER" buildx version >/dev/null 2>&1 && (( ${client%%.*} >= 23 )); then
        die "docker CLI $client has no buildx, so it cannot use BuildKit; the legacy builder ignores
    serve/Dockerfile.dockerignore and would send the whole repository as build context.
    Install the buildx plugin, or point DOCKER at a 20.10-22.x CLI."
    fi
fi
if curl -s -o /dev/null --max-time 2 "$BASE/"; then die "something already answers on $BASE; set PORT"; fi

# ---- build ------------------------------------------------------------------------------------
if [[ $SKIP_BUILD == 1 ]]; then
    "$DOCKER" image inspect "$IMAGE_TAG" >/dev/null 2>&1 || die "SKIP_BUILD=1 but image $IMAGE_TAG does not exist"
    log "SKIP_BUILD=1: using existing $IMAGE_TAG"
else
    log "building $IMAGE_TAG from $REPO (docker build -f serve/Dockerfile ${BUILD_ARGS})"
    t0=$(date +%s)
    # shellcheck disable=SC2086
    if ! (cd "$REPO" && "$DOCKER" build --progress=plain -f serve/Dockerfile -t "$IMAGE_TAG" $BUILD_ARGS . \
            > "$SCRATCH/build.log" 2>&1); then
        tail -n 40 "$SCRATCH/build.log" | sed 's/^/    /' >&2
        die "docker build failed (last 40 lines above)"
    fi
    build_s=$(( $(date +%s) - t0 ))
    log "build took ${build_s}s"
fi

# ---- run and wait for healthy -------------------------------------------------------------------
log "running $IMAGE_TAG as $NAME on 127.0.0.1:$PORT"
t0=$(date +%s)
# shellcheck disable=SC2086
"$DOCKER" run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" \
    -e MASML_SERVE_API_KEYS="$USER_KEY,$ADMIN_KEY:admin" $RUN_ARGS "$IMAGE_TAG" >/dev/null
started=1
status=none
while :; do
    running=$("$DOCKER" inspect --format '{{.State.Running}}' "$NAME")
    status=$("$DOCKER" inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}no-healthcheck{{end}}' "$NAME")
    [[ $status == healthy ]] && break
    [[ $running == true ]] || die "container exited before becoming healthy (exit code $("$DOCKER" inspect --format '{{.State.ExitCode}}' "$NAME"))"
    [[ $status == unhealthy || $status == no-healthcheck ]] && die "health status: $status"
    (( $(date +%s) - t0 < HEALTH_TIMEOUT )) || die "not healthy after ${HEALTH_TIMEOUT}s (status: $status)"
    sleep 1
done
healthy_s=$(( $(date +%s) - t0 ))
log "healthy after ${healthy_s}s (the first HEALTHCHECK probe runs at --interval, 15s)"

# ---- checks -------------------------------------------------------------------------------------
# http METHOD PATH [KEY] [BODY] -> sets $code, body in $SCRATCH/body
http() {
    local args=(-sS -o "$SCRATCH/body" -w '%{http_code}' --max-time 10 -X "$1")
    [[ -n ${3:-} ]] && args+=(-H "Authorization: Bearer $3")
    [[ -n ${4:-} ]] && args+=(-H 'Content-Type: application/json' --data "$4")
    code=$(curl "${args[@]}" "$BASE$2" 2>"$SCRATCH/curl.err") || code="curl-error: $(cat "$SCRATCH/curl.err")"
}
# pyjson 'python expression over d' -> prints the result; non-zero exit (and message) if it raises or is False
pyjson() {
    python3 - "$1" "$SCRATCH/body" <<'EOF'
import json, sys
d = json.load(open(sys.argv[2]))
r = eval(sys.argv[1], {"d": d})
if r is False:
    sys.exit("assertion false: " + sys.argv[1])
if r is not True:
    print(r)
EOF
}
body() { head -c 600 "$SCRATCH/body" 2>/dev/null; }

http GET /readyz
want=$(printf '%s\n' "${expect_models[@]}" | python3 -c 'import sys, json; print(json.dumps(sorted(sys.stdin.read().split())))')
if [[ $code == 200 ]] && out=$(pyjson "d['ready'] is True and sorted(d['models']) == $want" 2>&1); then
    ok "GET /readyz -> 200 $(body)"
else bad "GET /readyz (want 200, ready, models $want)" "HTTP $code: $(body) ${out:-}"; fi

http GET /v1/models "$USER_KEY"
if [[ $code == 200 ]] && tasks=$(pyjson "' '.join(sorted(m['task'] for m in d['models']))" 2>&1) \
        && [[ $tasks == "$(printf '%s\n' "${expect_models[@]}" | sort | xargs)" ]]; then
    ok "GET /v1/models with key -> 200, tasks: $tasks"
else bad "GET /v1/models with key (want 200 and tasks $EXPECT_MODELS)" "HTTP $code: $(body) ${tasks:-}"; fi

http POST /v1/models/onset/predict "$USER_KEY" "$PREDICT_BODY"
if [[ $code == 200 ]] && out=$(pyjson "len(d['predictions']) == 1 and d['predictions'][0]['patient_id'] == 'a' and 0 <= d['predictions'][0]['risk'] <= 1" 2>&1); then
    ok "POST /v1/models/onset/predict with key -> 200 $(body)"
else bad "POST /v1/models/onset/predict with key (want 200 and one risk in [0,1])" "HTTP $code: $(body) ${out:-}"; fi

http POST /v1/models/onset/predict "" "$PREDICT_BODY"
if [[ $code == 401 ]]; then ok "POST /v1/models/onset/predict without key -> 401 $(body)"
else bad "POST /v1/models/onset/predict without key (want 401)" "HTTP $code: $(body)"; fi

http GET /v1/models "wrong-$USER_KEY"
if [[ $code == 401 ]]; then ok "GET /v1/models with a wrong key -> 401"
else bad "GET /v1/models with a wrong key (want 401)" "HTTP $code: $(body)"; fi

exec_id=$("$DOCKER" exec "$NAME" id 2>&1 || true)
top_uids=$("$DOCKER" top "$NAME" -o pid,uid,args 2>&1 | awk 'NR > 1 {print $2}' | sort -u | xargs || true)
if [[ $exec_id == "uid=$EXPECTED_UID("* && $top_uids == "$EXPECTED_UID" ]]; then
    ok "runs as uid $EXPECTED_UID (docker exec id: $exec_id; docker top uids: $top_uids)"
else bad "runs as uid $EXPECTED_UID" "docker exec id: $exec_id; docker top uids: $top_uids"; fi

imports=$("$DOCKER" exec "$NAME" python -c '
import importlib.util, sys
bad = [m for m in sys.argv[1].split() if importlib.util.find_spec(m) is not None]
missing = [m for m in sys.argv[2].split() if importlib.util.find_spec(m) is None]
print("importable but forbidden: %s; required but missing: %s" % (bad or "none", missing or "none"))
sys.exit(1 if bad or missing else 0)' "$FORBIDDEN_MODULES" "$REQUIRED_MODULES" 2>&1) && rc=0 || rc=$?
if [[ $rc == 0 ]]; then ok "not importable in the image: $FORBIDDEN_MODULES; importable: $REQUIRED_MODULES"
else bad "module check" "$imports"; fi

app_ls=$("$DOCKER" exec "$NAME" ls /app 2>&1 | xargs || true)
if [[ $app_ls == "models serve" ]]; then ok "/app holds only: $app_ls"
else bad "/app should hold only 'models serve'" "ls /app: $app_ls"; fi

# onnxruntime 1.31 looks up Microsoft's telemetry host unless ORT_DISABLE_TELEMETRY=1 (seen with tcpdump on
# docker0); the Dockerfile sets it, and a clinical service must not send anything out.
telemetry_env=$("$DOCKER" exec "$NAME" printenv ORT_DISABLE_TELEMETRY 2>/dev/null || true)
if [[ $telemetry_env == 1 ]] && ! "$DOCKER" logs "$NAME" 2>&1 | grep -qi 'telemetry'; then
    ok "onnxruntime telemetry off (ORT_DISABLE_TELEMETRY=1, no telemetry line in the log)"
else bad "onnxruntime telemetry" "ORT_DISABLE_TELEMETRY=${telemetry_env:-unset}; set it to 1 in the image"; fi

size=$("$DOCKER" image ls --format '{{.Size}}' "$IMAGE_TAG" | head -n 1)
size_bytes=$("$DOCKER" image inspect --format '{{.Size}}' "$IMAGE_TAG")
log "image $IMAGE_TAG: $size ($size_bytes bytes)"
log "figures: build $( [[ -n ${build_s:-} ]] && echo "${build_s}s" || echo skipped), healthy after ${healthy_s}s, image $size"

echo "docker_check: $passed passed, $failed failed"
if (( failed > 0 )); then
    printf '[docker-check] failed: %s\n' "${failures[@]}" >&2
    exit 1
fi
