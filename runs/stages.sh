# Sourced by the run scripts: `stage NAME` prints a `=== NAME` line and appends the previous stage's
# wall time to $OUT/times.txt (this invocation's: a skipped stage shows the few seconds of its
# check); `stage ""` closes the last one, `finish` adds the whole job's time and prints the file.
t0=$(date +%s); ts=$t0; current=""
stage() {
  now=$(date +%s)
  [ -z "$current" ] || printf '%5d s  %s\n' $((now - ts)) "$current" >> "$OUT/times.txt"
  ts=$now; current=$1
  [ -z "$1" ] || { echo; echo "=== $1 ($(date +%H:%M:%S))"; }
}
finish() {
  stage ""
  printf '%5d s  whole job\n' $(( $(date +%s) - t0 )) >> "$OUT/times.txt"
  cat "$OUT/times.txt"
}
: > "$OUT/times.txt"
