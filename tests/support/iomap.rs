//! An observer independent of the eBPF recorder: the kernel's own
//! `iomap:iomap_dio_rw_begin` tracepoint, read as text from a private tracefs
//! instance. It sees every O_DIRECT request (`cache=none`) whatever QEMU's
//! `aio=` mode, with the file's inode, offset and length.

use std::io::{BufRead, BufReader};
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub struct Observer {
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    reads: Arc<Mutex<Vec<Range<u64>>>>,
    thread: Option<JoinHandle<()>>,
}

fn hex_field(line: &str, name: &str) -> Option<u64> {
    let rest = line.split(&format!(" {name} 0x")).nth(1)?;
    u64::from_str_radix(rest.split_whitespace().next()?, 16).ok()
}

impl Observer {
    /// Starts watching direct reads of `image`.
    pub fn start(image: &Path) -> Observer {
        let ino = std::fs::metadata(image).unwrap().ino();
        let dir = PathBuf::from(format!("/sys/kernel/tracing/instances/bootcache-observer-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let event = dir.join("events/iomap/iomap_dio_rw_begin");
        std::fs::write(event.join("filter"), format!("ino == {ino}")).expect("set the iomap filter");
        std::fs::write(dir.join("buffer_size_kb"), "16384").unwrap();
        std::fs::write(event.join("enable"), "1").expect("enable iomap_dio_rw_begin");
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(Mutex::new(Vec::new()));
        let pipe = std::fs::File::open(dir.join("trace_pipe")).unwrap();
        let (s, r) = (Arc::clone(&stop), Arc::clone(&reads));
        let thread = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if s.load(Ordering::Relaxed) && line.contains("bootcache-observer-stop") {
                    break;
                }
                if line.contains("iomap_dio_rw_begin")
                    && !line.contains("WRITE")
                    && let (Some(off), Some(len)) = (hex_field(&line, "offset"), hex_field(&line, "length"))
                {
                    r.lock().unwrap().push(off..off + len);
                }
            }
        });
        Observer { dir, stop, reads, thread: Some(thread) }
    }

    /// Stops and returns every direct read seen.
    pub fn stop(mut self) -> Vec<Range<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        // A marker through trace_marker wakes the reader after the last event.
        let _ = std::fs::write(self.dir.join("trace_marker"), "bootcache-observer-stop\n");
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.reads.lock().unwrap())
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("events/iomap/iomap_dio_rw_begin/enable"), "0");
        let _ = std::fs::remove_dir(&self.dir);
    }
}
