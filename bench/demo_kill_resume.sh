#!/bin/bash
# Reference: run A first with `prunepilot demo --out /tmp/demoA --no-history`; output goes to stdout (bench/results/demo_kill_resume.txt).
# kill -9 the demo after its 2nd attempt is journaled, resume, compare with the uninterrupted run A
cd /tmp; rm -rf demoB
OMP_NUM_THREADS=1 setsid /work/main/.venv/bin/prunepilot demo --out /tmp/demoB --no-history > /tmp/demoB.log 2>&1 &
PID=$!
while true; do
  sleep 2
  n=$(sqlite3 /tmp/demoB/journal.sqlite "select count(*) from attempts" 2>/dev/null || echo 0)
  if [ "${n:-0}" -ge 2 ]; then break; fi
done
sleep 5
kill -9 -$PID; echo "killed after $n attempts at $(date +%T)"
RID=$(cat /tmp/demoB/run_id)
OMP_NUM_THREADS=1 /work/main/.venv/bin/prunepilot runs resume $RID --journal /tmp/demoB/journal.sqlite > /tmp/demoB_resume.log 2>&1; echo "resume rc=$?"
sha256sum /tmp/demoA/model.safetensors /tmp/demoB/model.safetensors
for d in demoA demoB; do sqlite3 /tmp/$d/journal.sqlite "select round, json_extract(data,'$.verdict'), json_extract(data,'$.score') from attempts"; done
