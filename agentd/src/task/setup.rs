//! The setup step: a command run once in `/workspace` after the workspace lands and before
//! the agent starts (installing the project's dependencies, say). Its output is streamed as
//! `setup.output` events while it runs (bounded: [`SETUP_STREAM_BYTES`] per attempt), its
//! result is kept on the attempt, and what it changed is committed into the baseline, so the
//! diff shows the agent's work only. A failing setup fails the attempt with its output.

use std::sync::Arc;

use super::*;
use crate::exec::{Stream, Utf8Chunker};

/// Most bytes of one attempt's setup output sent as events; the rest is only counted (the
/// end of it is kept in the attempt's `setup.output`).
const SETUP_STREAM_BYTES: usize = 1 << 20;

/// Checks a setup command.
pub(super) fn validate(command: &str) -> Result<()> {
    if command.trim().is_empty() || command.contains('\0') || command.len() > MAX_SETUP_BYTES {
        return Err(Error::Invalid(format!(
            "setup must be a non-empty shell command of at most {MAX_SETUP_BYTES} bytes"
        )));
    }
    Ok(())
}

impl TaskManager {
    /// Runs the setup of attempt `n` in its sandbox and commits what it changed into the
    /// baseline; the attempt's outcome when it fails.
    pub(super) async fn setup(
        &self,
        task: &Arc<Task>,
        n: u32,
        sb: &Arc<Sandbox>,
        command: &str,
        deadline_ms: u64,
    ) -> std::result::Result<(), Outcome> {
        match self.run_setup(task, n, sb, command, deadline_ms).await {
            Ok(done) => {
                self.update(task, n, |a| {
                    a.setup = Some(done.result);
                    a.baseline = Some(done.baseline);
                    a.timings.setup_ms = Some(done.ms);
                });
                Ok(())
            }
            Err((outcome, result)) => {
                if result.is_some() {
                    self.update(task, n, |a| a.setup = result);
                }
                Err(outcome)
            }
        }
    }

    /// Runs a setup in `sb` (for attempt `n`, or 0: the task's shared preparation, which is
    /// what its events then say) and commits what it changed into the baseline. On a
    /// failure: why, and the setup's result if it ran to its end.
    pub(super) async fn run_setup(
        &self,
        task: &Arc<Task>,
        n: u32,
        sb: &Arc<Sandbox>,
        command: &str,
        deadline_ms: u64,
    ) -> std::result::Result<SetupDone, (Outcome, Option<SetupResult>)> {
        let rec = task.snapshot();
        let limit = Duration::from_secs(
            rec.request
                .setup_timeout_secs
                .unwrap_or(DEFAULT_SETUP_TIMEOUT_SECS),
        );
        let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms()).max(1000));
        self.emit(
            task,
            "setup",
            serde_json::json!({"attempt": n, "state": "running"}),
        );
        let t = Instant::now();
        let mut stream = Streamed::new(SETUP_STREAM_BYTES);
        let mut each = |_: Stream, data: &[u8]| {
            match stream.push(data) {
            Chunk::Text(text) => self.emit(
                task,
                "setup.output",
                serde_json::json!({"attempt": n, "text": text}),
            ),
            Chunk::Cut => self.emit(
                task,
                "setup.output",
                serde_json::json!({"attempt": n, "text": "", "truncated": true,
                    "message": format!("more than {SETUP_STREAM_BYTES} bytes of output: the rest is not streamed (its end is in the attempt's setup.output)")}),
            ),
            Chunk::Nothing => {}
        }
        };
        let out = self
            .mgr
            .exec_collect_each(
                sb,
                // stderr into stdout: the output keeps its order.
                vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    format!("{{\n{command}\n}} 2>&1"),
                ],
                Some(WORKSPACE_DIR),
                left.min(limit),
                CHECK_OUTPUT_TAIL,
                &mut each,
            )
            .await
            .map_err(|e| (Outcome::Lost(format!("the setup could not run: {e}")), None))?;
        if let Chunk::Text(text) = stream.finish() {
            self.emit(
                task,
                "setup.output",
                serde_json::json!({"attempt": n, "text": text}),
            );
        }
        let r = attempt::check_result("setup", 0, &out, limit, left, t.elapsed());
        let result = SetupResult {
            exit_code: r.exit_code,
            passed: r.passed,
            output: r.output,
            duration_ms: r.duration_ms,
            timed_out: r.timed_out,
        };
        self.emit(
            task,
            "setup",
            serde_json::json!({"attempt": n, "state": if result.passed { "passed" } else { "failed" },
                "exit_code": result.exit_code, "timed_out": result.timed_out, "duration_ms": result.duration_ms}),
        );
        if !result.passed {
            let why = crate::sandbox::setup_failure(&result, limit);
            return Err((Outcome::Failed(why), Some(result)));
        }
        // What the setup changed belongs to the baseline (ignored and excluded files stay
        // out of both, as they do of the diff).
        let baseline = match self.commit_setup(sb).await {
            Ok(b) => b,
            Err(why) => return Err((Outcome::Failed(why), Some(result))),
        };
        Ok(SetupDone {
            result,
            baseline,
            ms: ms(t.elapsed()),
        })
    }
}

/// A setup that passed: its result, the baseline with what it changed, its time (ms).
pub(super) struct SetupDone {
    pub result: SetupResult,
    pub baseline: String,
    pub ms: u64,
}

/// What to send of a chunk of output.
#[derive(Debug, PartialEq)]
enum Chunk {
    /// This text.
    Text(String),
    /// The cap was just reached: say so once.
    Cut,
    /// Nothing (an incomplete character kept for the next chunk, or past the cap).
    Nothing,
}

/// Output turned into text as it comes (characters split between chunks are kept whole by
/// [`Utf8Chunker`]), at most `cap` bytes of it.
struct Streamed {
    text: Utf8Chunker,
    /// Bytes sent so far.
    sent: usize,
    /// Most bytes sent.
    cap: usize,
}

impl Streamed {
    fn new(cap: usize) -> Streamed {
        Streamed {
            text: Utf8Chunker::default(),
            sent: 0,
            cap,
        }
    }

    fn admit(&mut self, text: String) -> Chunk {
        if self.sent >= self.cap {
            return Chunk::Nothing;
        }
        if text.len() > self.cap - self.sent {
            self.sent = self.cap;
            return Chunk::Cut;
        }
        self.sent += text.len();
        if text.is_empty() {
            Chunk::Nothing
        } else {
            Chunk::Text(text)
        }
    }

    /// The text of `data` to send now.
    fn push(&mut self, data: &[u8]) -> Chunk {
        if self.sent >= self.cap {
            return Chunk::Nothing;
        }
        let text = self.text.push(data);
        self.admit(text)
    }

    /// What is left when the output ends (an incomplete character, replaced).
    fn finish(&mut self) -> Chunk {
        let text = self.text.finish();
        self.admit(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_streamed_keeps_characters_whole() {
        let mut s = Streamed::new(1000);
        let e = "é".as_bytes();
        assert_eq!(s.push(&[b'a', e[0]]), Chunk::Text("a".into()));
        assert_eq!(s.push(&[e[1], b'b']), Chunk::Text("éb".into()));
        let euro = "€".as_bytes();
        assert_eq!(s.push(&euro[..2]), Chunk::Nothing);
        assert_eq!(s.finish(), Chunk::Text("\u{fffd}".into()));
    }

    #[test]
    fn test_streamed_stops_at_the_cap_and_says_so_once() {
        let mut s = Streamed::new(10);
        assert_eq!(s.push(b"12345"), Chunk::Text("12345".into()));
        assert_eq!(s.push(b"123456"), Chunk::Cut);
        assert_eq!(s.push(b"1"), Chunk::Nothing);
        assert_eq!(s.finish(), Chunk::Nothing);
    }

    #[test]
    fn test_setup_commands_are_checked() {
        assert!(validate("pip install -e .").is_ok());
        assert!(validate("  ").is_err());
        assert!(validate("a\0b").is_err());
        assert!(validate(&"x".repeat(MAX_SETUP_BYTES + 1)).is_err());
    }
}
