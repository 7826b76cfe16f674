# Shared by the deployment scripts (sourced, not run).
#
# State (databases, FLWR_HOME folders with a copy of every run's app, logs,
# PID files) lives OUTSIDE the app directory by default: `flwr run .` ships the
# app directory, and state inside it is shipped with every run (the second run
# carried the first one's app copies, the third failed Flower's depth limit).
# Default: $BOUQUET_DEPLOY_STATE, else $XDG_STATE_HOME/bouquet-deploy, else
# ~/.local/state/bouquet-deploy.

default_state_dir() {
  echo "${BOUQUET_DEPLOY_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/bouquet-deploy}"
}

# Warn when DIR lies inside a Flower app (a parent with a pyproject.toml that
# has [tool.flwr.app]): `flwr run` there ships DIR unless the app's root
# .gitignore lists it (Bouquet's lists bouquet-deploy/).
warn_if_inside_app() {
  local dir parent
  dir=$(cd "$1" && pwd)
  parent=$dir
  while [ "$parent" != "/" ]; do
    parent=$(dirname "$parent")
    if [ -f "$parent/pyproject.toml" ] && grep -q '^\[tool\.flwr\.app\]' "$parent/pyproject.toml"; then
      echo "warning: state directory $dir is inside the Flower app $parent:" \
        "flwr run ships it with the app unless $parent/.gitignore lists it" >&2
      return
    fi
  done
}

# All live descendants of the given PIDs (children first found through ppid).
descendants_of() {
  local todo=("$@") found=() pid child
  while [ ${#todo[@]} -gt 0 ]; do
    pid=${todo[0]}
    todo=("${todo[@]:1}")
    for child in $(pgrep -P "$pid" 2>/dev/null); do
      found+=("$child")
      todo+=("$child")
    done
  done
  echo "${found[@]-}"
}

alive() {  # any of the PIDs still running (zombies do not count)
  local pid state
  for pid in "$@"; do
    state=$(ps -o stat= -p "$pid" 2>/dev/null) || continue
    case $state in Z*) ;; *) return 0 ;; esac
  done
  return 1
}

# stop_tree GRACE PID...: SIGTERM to the PIDs and every descendant (Flower's
# flower-superexec, flwr-serverapp and flwr-clientapp processes, collected
# before anything is signalled: once their parent is gone they are orphans),
# wait up to GRACE seconds, SIGKILL what is left, then wait until all are gone.
# Prints the PIDs that had to be killed.
stop_tree() {
  local grace=$1 all=() pid killed=()
  shift
  [ $# -gt 0 ] || return 0
  # shellcheck disable=SC2207
  all=("$@" $(descendants_of "$@"))
  kill -TERM "${all[@]}" 2>/dev/null
  for _ in $(seq $((grace * 10))); do
    alive "${all[@]}" || return 0
    sleep 0.1
  done
  for pid in "${all[@]}"; do
    if alive "$pid"; then killed+=("$pid"); kill -KILL "$pid" 2>/dev/null; fi
  done
  echo "SIGKILL after ${grace}s: ${killed[*]}" >&2
  for _ in $(seq 50); do
    alive "${all[@]}" || return 0
    sleep 0.1
  done
  echo "still running after SIGKILL: $(for p in "${all[@]}"; do alive "$p" && echo "$p"; done)" >&2
  return 1
}
