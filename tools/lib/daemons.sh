# Process bookkeeping shared by tools/slurm-dev-cluster and tools/slurm24-dev-cluster (sourced).
#
# Every daemon a dev cluster starts is recorded in $PIDS as "NAME PID START" (START = the process'
# start time), so that `down` stops exactly those processes, never a reused PID and never by name.
# The sourcing script defines: log, die, STATE (log/ lives there) and PIDS.

# Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat); empty if gone.
proc_start() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }                       # drop "pid (comm) ", comm may contain spaces
    local -a f
    read -ra f <<<"$stat"                   # f[0] is field 3 (state), f[19] is field 22 (starttime)
    [ "${f[0]}" = Z ] && return 0           # a zombie waiting for PID 1 to reap it is dead to us
    echo "${f[19]}"
}

# True when PID is alive and is the very process we recorded (same start time).
is_ours() { [ -n "$1" ] && [ "$(proc_start "$1")" = "$2" ]; }

# start_daemon NAME CMD...: run CMD in its own session, stdout/stderr to log/NAME.out, record its PID.
start_daemon() {
    local name=$1 pid start
    shift
    setsid "$@" </dev/null >>"$STATE/log/$name.out" 2>&1 9<&- &    # 9<&-: the daemon must not hold our lock
    pid=$!
    start=$(proc_start "$pid")
    [ -n "$start" ] || die "$name exited at once; see $STATE/log/$name.out"
    echo "$name $pid $start" >>"$PIDS"
}

# Names of recorded daemons that are not running any more (empty when all are alive).
dead_daemons() {
    local name pid start
    [ -f "$PIDS" ] || { echo "(no pid file)"; return; }
    while read -r name pid start; do
        is_ours "$pid" "$start" || echo "$name"
    done <"$PIDS"
}

# term_then_kill PID START ...: TERM all at once, wait up to 10 s, KILL the ones still there.
term_then_kill() {
    local -a pids=() starts=()
    local i j alive
    while [ $# -gt 0 ]; do
        if is_ours "$1" "$2"; then kill -TERM "$1" 2>/dev/null || true; pids+=("$1"); starts+=("$2"); fi
        shift 2
    done
    for ((i = 0; i < 100; i++)); do
        alive=0
        for j in "${!pids[@]}"; do is_ours "${pids[$j]}" "${starts[$j]}" && alive=1; done
        [ $alive = 0 ] && return 0
        sleep 0.1
    done
    for j in "${!pids[@]}"; do
        if is_ours "${pids[$j]}" "${starts[$j]}"; then
            log "pid ${pids[$j]} ignored TERM for 10 s; sending KILL"
            kill -KILL "${pids[$j]}" 2>/dev/null || true
        fi
    done
}

# stop_daemons PATTERN: stop the recorded daemons whose name matches the shell PATTERN.
stop_daemons() {
    local name pid start
    local -a args=()
    [ -f "$PIDS" ] || return 0
    while read -r name pid start; do
        # shellcheck disable=SC2254
        case $name in $1) args+=("$pid" "$start") ;; esac
    done <"$PIDS"
    [ ${#args[@]} = 0 ] || term_then_kill "${args[@]}"
}
