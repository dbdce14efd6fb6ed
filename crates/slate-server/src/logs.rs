//! Append-only job logs on disk, with live following for readers while a job runs.

use slate_core::JobId;
use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::fs::{File, OpenOptions};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;

/// Default cap on one job's log; beyond it output is dropped with a marker.
pub const DEFAULT_LOG_CAP: u64 = 64 << 20;

/// Where job logs live and who is waiting for more of them.
#[derive(Clone)]
pub struct LogStore {
    dir: PathBuf,
    cap: u64,
    /// Per live job: the current length of its log, and whether it is finished.
    live: Arc<Mutex<HashMap<JobId, watch::Sender<LogProgress>>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogProgress {
    pub len: u64,
    pub finished: bool,
}

/// The writer of one job's log, owned by the job's runner.
pub struct LogWriter {
    file: File,
    len: u64,
    cap: u64,
    truncated: bool,
    progress: watch::Sender<LogProgress>,
}

impl LogStore {
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            cap: DEFAULT_LOG_CAP,
            live: Arc::default(),
        })
    }

    pub fn with_cap(mut self, cap: u64) -> Self {
        self.cap = cap;
        self
    }

    pub fn path(&self, job: JobId) -> PathBuf {
        self.dir.join(format!("{}.log", job.0))
    }

    /// Open the job's log for appending (an earlier attempt's output stays).
    pub async fn writer(&self, job: JobId) -> std::io::Result<LogWriter> {
        self.writer_with_cap(job, self.cap).await
    }

    /// Like [`LogStore::writer`] with a cap of its own (the pool's `limits.log`).
    pub async fn writer_with_cap(&self, job: JobId, cap: u64) -> std::io::Result<LogWriter> {
        let path = self.path(job);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await?;
        let len = file.metadata().await?.len();
        let progress = {
            let mut live = self.live.lock().unwrap();
            let tx = live.entry(job).or_insert_with(|| {
                watch::channel(LogProgress {
                    len,
                    finished: false,
                })
                .0
            });
            tx.send_replace(LogProgress {
                len,
                finished: false,
            });
            tx.clone()
        };
        Ok(LogWriter {
            file,
            len,
            cap,
            truncated: false,
            progress,
        })
    }

    /// Subscribe to a job's progress; `None` when nobody is writing it now.
    pub fn subscribe(&self, job: JobId) -> Option<watch::Receiver<LogProgress>> {
        self.live.lock().unwrap().get(&job).map(|tx| tx.subscribe())
    }

    /// Forget a finished job's live state (its readers have been told it finished).
    pub fn release(&self, job: JobId) {
        let mut live = self.live.lock().unwrap();
        if let Some(tx) = live.get(&job) {
            if tx.borrow().finished {
                live.remove(&job);
            }
        }
    }

    /// Read up to `max` bytes from `offset`.
    pub async fn read_at(&self, job: JobId, offset: u64, max: usize) -> std::io::Result<Vec<u8>> {
        read_at(&self.path(job), offset, max).await
    }
}

async fn read_at(path: &Path, offset: u64, max: usize) -> std::io::Result<Vec<u8>> {
    let mut f = match File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    f.seek(SeekFrom::Start(offset)).await?;
    let mut buf = Vec::with_capacity(max.min(1 << 20));
    (&mut f).take(max as u64).read_to_end(&mut buf).await?;
    Ok(buf)
}

impl LogWriter {
    /// Append bytes; past the cap they are dropped and a single marker is written.
    pub async fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.truncated {
            return Ok(());
        }
        let room = self.cap.saturating_sub(self.len) as usize;
        if data.len() > room {
            self.file.write_all(&data[..room]).await?;
            let marker = format!(
                "\n==> log truncated: the job wrote more than {} bytes\n",
                self.cap
            );
            self.file.write_all(marker.as_bytes()).await?;
            self.len += (room + marker.len()) as u64;
            self.truncated = true;
        } else {
            self.file.write_all(data).await?;
            self.len += data.len() as u64;
        }
        self.progress.send_replace(LogProgress {
            len: self.len,
            finished: false,
        });
        Ok(())
    }

    /// A line of slate's own (step headers, errors), marked so it stands out from output.
    pub async fn note(&mut self, line: &str) -> std::io::Result<()> {
        let mut s = String::with_capacity(line.len() + 6);
        s.push_str("==> ");
        s.push_str(line);
        s.push('\n');
        // Notes are never truncated: a user must see why a job ended.
        self.file.write_all(s.as_bytes()).await?;
        self.len += s.len() as u64;
        self.progress.send_replace(LogProgress {
            len: self.len,
            finished: false,
        });
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Flush to disk and tell followers the log is complete.
    pub async fn finish(mut self) -> std::io::Result<()> {
        self.file.flush().await?;
        self.file.sync_data().await?;
        self.progress.send_replace(LogProgress {
            len: self.len,
            finished: true,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn append_follow_and_cap() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path().to_path_buf())
            .unwrap()
            .with_cap(10);
        let job = JobId(1);
        let mut w = logs.writer(job).await.unwrap();
        let mut rx = logs.subscribe(job).unwrap();
        w.append(b"hello ").await.unwrap();
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().len, 6);
        w.append(b"world, and more").await.unwrap();
        w.append(b"dropped").await.unwrap();
        w.finish().await.unwrap();
        let all = logs.read_at(job, 0, 1 << 20).await.unwrap();
        let text = String::from_utf8(all).unwrap();
        assert!(text.starts_with("hello worl\n==> log truncated"), "{text}");
        assert!(!text.contains("dropped"));
        assert!(rx.borrow_and_update().finished);
        logs.release(job);
        assert!(logs.subscribe(job).is_none());
    }

    #[tokio::test]
    async fn missing_log_reads_empty() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path().to_path_buf()).unwrap();
        assert!(logs.read_at(JobId(9), 0, 10).await.unwrap().is_empty());
    }
}
