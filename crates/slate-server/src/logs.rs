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
    masker: Masker,
}

/// Secrets shorter than this are not masked (masking "a" would garble every log).
pub const MIN_MASKED_LEN: usize = 4;

/// What replaces a secret's value in a log.
pub const MASK: &[u8] = b"***";

/// Replaces secret values in a byte stream that arrives in chunks: a value split across
/// two chunks is still found, because output that could be the start of one is held
/// back (at most the longest value less one byte) until the next chunk or the end.
#[derive(Default)]
pub struct Masker {
    masks: Vec<Vec<u8>>,
    carry: Vec<u8>,
}

impl Masker {
    /// Masks shorter than [`MIN_MASKED_LEN`] are ignored; duplicates are harmless.
    pub fn new(masks: Vec<Vec<u8>>) -> Self {
        let mut masks: Vec<Vec<u8>> = masks
            .into_iter()
            .filter(|m| m.len() >= MIN_MASKED_LEN)
            .collect();
        // Longest first: at one position the longest matching value is masked.
        masks.sort_by_key(|m| std::cmp::Reverse(m.len()));
        masks.dedup();
        Self {
            masks,
            carry: Vec::new(),
        }
    }

    /// Mask `data` (after what was held back); returns what can be written now.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        if self.masks.is_empty() {
            return data.to_vec();
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(data);
        let (out, rest) = self.mask(&buf, false);
        self.carry = buf[rest..].to_vec();
        out
    }

    /// Everything held back, masked: the stream ended (or a note interrupts it).
    pub fn flush(&mut self) -> Vec<u8> {
        let buf = std::mem::take(&mut self.carry);
        self.mask(&buf, true).0
    }

    /// Mask `buf`; unless `end`, stop where the rest could be the start of a value and
    /// return that offset as the part not consumed.
    fn mask(&self, buf: &[u8], end: bool) -> (Vec<u8>, usize) {
        if self.masks.is_empty() {
            return (buf.to_vec(), buf.len());
        }
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        while i < buf.len() {
            let rest = &buf[i..];
            if !end
                && self
                    .masks
                    .iter()
                    .any(|m| rest.len() < m.len() && m.starts_with(rest))
            {
                return (out, i);
            }
            match self.masks.iter().find(|m| rest.starts_with(m)) {
                Some(m) => {
                    out.extend_from_slice(MASK);
                    i += m.len();
                }
                None => {
                    out.push(buf[i]);
                    i += 1;
                }
            }
        }
        (out, i)
    }
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
            masker: Masker::default(),
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
    // Past the end (or an absurd offset from a client): nothing to read, not an error.
    if offset >= f.metadata().await?.len() {
        return Ok(Vec::new());
    }
    f.seek(SeekFrom::Start(offset)).await?;
    let mut buf = Vec::with_capacity(max.min(1 << 20));
    (&mut f).take(max as u64).read_to_end(&mut buf).await?;
    Ok(buf)
}

impl LogWriter {
    /// Replace these values (secrets a job's steps get) by `***` in everything written
    /// from now on, even when one is split across appends.
    pub fn with_masks(mut self, masks: Vec<Vec<u8>>) -> Self {
        self.masker = Masker::new(masks);
        self
    }

    /// Append output; secret values are masked, and past the cap bytes are dropped and
    /// a single marker is written.
    pub async fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        let data = self.masker.push(data);
        self.write_output(&data).await
    }

    /// Write output held back by the masker (it could have been the start of a value).
    async fn flush_masked(&mut self) -> std::io::Result<()> {
        let rest = self.masker.flush();
        if rest.is_empty() {
            return Ok(());
        }
        self.write_output(&rest).await
    }

    async fn write_output(&mut self, data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() || self.truncated {
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
        // Output before the note stays before it.
        self.flush_masked().await?;
        let mut s = String::with_capacity(line.len() + 6);
        s.push_str("==> ");
        s.push_str(line);
        s.push('\n');
        // A note may quote what a job made (file names): it is masked too.
        let s = self.masker.mask(s.as_bytes(), true).0;
        // Notes are never truncated: a user must see why a job ended.
        self.file.write_all(&s).await?;
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
        self.flush_masked().await?;
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

    fn masked(masks: &[&str], chunks: &[&str]) -> String {
        let mut m = Masker::new(masks.iter().map(|s| s.as_bytes().to_vec()).collect());
        let mut out = Vec::new();
        for c in chunks {
            out.extend(m.push(c.as_bytes()));
        }
        out.extend(m.flush());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn masks_values_whole_split_and_several() {
        assert_eq!(masked(&["hunter22"], &["pw=hunter22\n"]), "pw=***\n");
        // Split across two, then across many chunks (one byte each).
        assert_eq!(masked(&["hunter22"], &["pw=hun", "ter22!"]), "pw=***!");
        let text = "a hunter22 b hunter22";
        let bytes: Vec<String> = text.chars().map(String::from).collect();
        let bytes: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(masked(&["hunter22"], &bytes), "a *** b ***");
        // Several secrets, each wherever it appears.
        assert_eq!(
            masked(
                &["alpha-1", "beta-22"],
                &["x alp", "ha-1 y beta", "-22 z alpha-1"]
            ),
            "x *** y *** z ***"
        );
        // A near miss is output unchanged, once the stream shows it is not a value.
        assert_eq!(
            masked(&["hunter22"], &["hunter2", "3 hunter2"]),
            "hunter23 hunter2"
        );
        // Too short to mask: left alone.
        assert_eq!(masked(&["abc"], &["abc abc"]), "abc abc");
        // No masks: untouched.
        assert_eq!(masked(&[], &["anything"]), "anything");
    }

    #[test]
    fn overlapping_values_leave_nothing_behind() {
        // Repeats of a value overlapping themselves.
        assert_eq!(masked(&["aaaa"], &["aaaaaa"]), "***aa");
        assert_eq!(masked(&["aaaa"], &["aa", "aaaaaa"]), "******");
        // One value inside another: the longer one is masked whole.
        assert_eq!(
            masked(&["abcd", "abcdefgh"], &["x abcdef", "gh y abcd"]),
            "x *** y ***"
        );
        assert_eq!(masked(&["abcdefgh", "abcd"], &["abcdefg"]), "***efg");
        // Two values sharing a part: whichever starts first is masked.
        assert_eq!(masked(&["abcdef", "defghi"], &["abcdefghi"]), "***ghi");
        // The other value, split over chunks, still leaves nothing of itself behind.
        assert_eq!(masked(&["abcdef", "defghi"], &["xxdef", "ghi"]), "xx***");
    }

    #[tokio::test]
    async fn log_writer_masks_across_appends_notes_and_finish() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path().to_path_buf()).unwrap();
        let job = JobId(3);
        let mut w = logs
            .writer(job)
            .await
            .unwrap()
            .with_masks(vec![b"s3cr3t-value".to_vec(), b"xy".to_vec()]);
        w.append(b"key is s3cr").await.unwrap();
        w.append(b"3t-value; xy\n").await.unwrap();
        w.append(b"ends with s3cr3t-va").await.unwrap();
        w.note("file s3cr3t-value.txt kept").await.unwrap();
        w.append(b"tail s3cr3t-").await.unwrap();
        w.append(b"value").await.unwrap();
        w.append(b" s3cr3t").await.unwrap();
        w.finish().await.unwrap();
        let text = String::from_utf8(logs.read_at(job, 0, 1 << 20).await.unwrap()).unwrap();
        assert_eq!(
            text,
            "key is ***; xy\nends with s3cr3t-va==> file ***.txt kept\ntail *** s3cr3t"
        );
        let on_disk = std::fs::read_to_string(logs.path(job)).unwrap();
        assert!(!on_disk.contains("s3cr3t-value"), "{on_disk}");
    }

    #[tokio::test]
    async fn missing_log_reads_empty() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path().to_path_buf()).unwrap();
        assert!(logs.read_at(JobId(9), 0, 10).await.unwrap().is_empty());
    }
}
