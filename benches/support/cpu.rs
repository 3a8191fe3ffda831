//! Where the CPU went over a benchmark's interval: the whole machine and every process, from
//! /proc (shared by the benchmarks through `#[path]`).
#![allow(dead_code)]

use std::collections::HashMap;

/// CPU ticks: the whole machine (busy, total) and every process (comm, utime + stime +
/// cutime + cstime: a process's reaped children count towards it).
pub struct Cpu {
    busy: u64,
    total: u64,
    procs: HashMap<u32, (String, u64)>,
}

fn proc_stat(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // After "(comm)": state is [0]; utime, stime, cutime, cstime are fields 14-17, [11..15].
    Some((comm, f.get(11..15)?.iter().sum()))
}

pub fn cpu_now() -> Cpu {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    let procs = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|pid| Some((pid, proc_stat(pid)?)))
                .collect()
        })
        .unwrap_or_default();
    Cpu {
        busy: total - idle,
        total,
        procs,
    }
}

fn clock_ticks() -> f64 {
    #[allow(unsafe_code)]
    // SAFETY: sysconf(3) takes an integer name and has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// Where the CPU went between two snapshots, `secs` of wall time.
pub struct CpuUse {
    busy: f64,
    total: f64,
    /// Core-seconds by command name, largest first.
    top: Vec<(String, f64)>,
}

pub fn cpu_use(a: &Cpu, b: &Cpu) -> CpuUse {
    let hz = clock_ticks();
    let mut by: HashMap<String, u64> = HashMap::new();
    for (pid, (comm, t)) in &b.procs {
        // By pid: kernel workers rename themselves after the work item they run.
        let before = a.procs.get(pid).map_or(0, |(_, t0)| *t0);
        let name = if comm.starts_with("kworker") {
            "kworker"
        } else {
            comm
        };
        *by.entry(name.to_string()).or_default() += t.saturating_sub(before);
    }
    let mut top: Vec<(String, f64)> = by
        .into_iter()
        .filter(|(_, t)| *t > 0)
        .map(|(c, t)| (c, t as f64 / hz))
        .collect();
    top.sort_by(|x, y| y.1.total_cmp(&x.1));
    CpuUse {
        busy: (b.busy - a.busy) as f64 / hz,
        total: (b.total - a.total) as f64 / hz,
        top,
    }
}

impl CpuUse {
    pub fn line(&self) -> String {
        let top: Vec<String> = self
            .top
            .iter()
            .take(6)
            .map(|(c, s)| format!("{c} {s:.2}"))
            .collect();
        format!(
            "machine {:.0}% busy ({:.2} of {:.2} core-s); top core-s by command: {}",
            100.0 * self.busy / self.total.max(1e-9),
            self.busy,
            self.total,
            top.join(", ")
        )
    }
}
