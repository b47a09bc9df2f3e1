#!/bin/bash
# On the device: wait up to $1 seconds (default 420) for "=== done" in /tmp/job/progress, then pack
# /tmp/job into $OUT/job.tgz. Call it in device runs back to back: a machine idle for 30 s is given
# back, and /tmp/job with it.
end=$((SECONDS + ${1:-420}))
while [ $SECONDS -lt $end ]; do
  grep -q "=== done" /tmp/job/progress 2>/dev/null && break
  sleep 5
done
tail -5 /tmp/job/progress 2>/dev/null
tar czf "$OUT/job.tgz" -C /tmp job 2>/dev/null
ls -la /tmp/job | tail -20
