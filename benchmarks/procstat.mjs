// What the load generators (loadgen.mjs, storm.mjs) read of processes in /proc: CPU time
// (utime + stime of every thread, /proc/<pid>/stat, in clock ticks), run-queue wait (time
// runnable while something else had the core, /proc/<pid>/schedstat) and resident memory.
// A process that is gone reads as 0.

import fs from 'node:fs';

export function statFields(pid) {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
}

export function cpuSeconds(pid, clkTck) {
  try {
    const f = statFields(pid);
    return (Number(f[11]) + Number(f[12])) / clkTck;
  } catch {
    return 0;
  }
}

export function runWait(pid) {
  try {
    return Number(fs.readFileSync(`/proc/${pid}/schedstat`, 'latin1').split(' ')[1]) / 1e9;
  } catch {
    return 0;
  }
}

export function rssKiB(pid) {
  try {
    const m = /VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'latin1'));
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}
