//! One progress bar per build stage (indicatif), hidden when stderr is not a terminal.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// Where a build reports its stages.
pub struct Progress {
    multi: MultiProgress,
}

impl Progress {
    /// Bars on stderr when it is a terminal, nothing otherwise (CI logs, tests).
    pub fn stderr() -> Progress {
        if std::io::stderr().is_terminal() {
            Progress {
                multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            }
        } else {
            Progress::hidden()
        }
    }

    pub fn hidden() -> Progress {
        Progress {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
        }
    }

    /// A bar for a stage of `steps` steps (0 means a spinner).
    pub(crate) fn stage(&self, name: &str, steps: u64) -> StageBar {
        let bar = if steps == 0 {
            ProgressBar::new_spinner()
        } else {
            ProgressBar::new(steps)
        };
        let bar = self.multi.add(bar);
        let template = if steps == 0 {
            "{spinner} {prefix:>16} [{elapsed:>4}] {wide_msg}"
        } else {
            "{spinner} {prefix:>16} [{elapsed:>4}] {bar:20} {pos}/{len} {wide_msg}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_prefix(name.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        StageBar { bar }
    }
}

pub(crate) struct StageBar {
    bar: ProgressBar,
}

impl StageBar {
    pub(crate) fn message(&self, msg: &str) {
        let line: String = msg.lines().next().unwrap_or("").chars().take(80).collect();
        self.bar.set_message(line);
    }
    pub(crate) fn inc(&self) {
        self.bar.inc(1);
    }
    pub(crate) fn finish(&self, msg: &str) {
        self.bar.finish_with_message(msg.to_string());
    }
    pub(crate) fn fail(&self, msg: &str) {
        self.bar.abandon_with_message(msg.to_string());
    }
}
