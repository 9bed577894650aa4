//! The decisions of an attempt's rounds, as pure functions the driver
//! ([`super::TaskManager`]'s `drive`) follows: what a check's run means ([`check_result`])
//! and what comes after it ([`after_check`]). No I/O here, so each rule has a unit test.

use std::time::Duration;

use super::{tail, CheckResult, CHECK_OUTPUT_TAIL};
use crate::sandbox::ExecOutput;

/// What an attempt does after a round's check.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// The check passed: the attempt succeeded.
    Succeeded,
    /// The last round's check failed: the attempt failed, saying why.
    Failed(String),
    /// Another round: the agent gets the check's output.
    Round(u32),
}

/// The result of round `round`'s check from its run: `limit` is the check's own time limit,
/// `left` what was left of the task's (the run was killed at the smaller one), `took` how
/// long it ran. A check killed at the task's limit is not "timed out" (the task's timeout
/// handles that); its output says why it ended, never more than the tail agentd keeps.
pub(super) fn check_result(
    round: u32,
    out: &ExecOutput,
    limit: Duration,
    left: Duration,
    took: Duration,
) -> CheckResult {
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    let timed_out = out.timed_out && limit <= left;
    if timed_out {
        if !output.is_empty() && !output.ends_with('\n') {
            output.push('\n');
        }
        output.push_str(&format!(
            "agentd: the check timed out after {} s and was killed\n",
            limit.as_secs()
        ));
    }
    if let Some(e) = &out.error {
        output.push_str(&format!("agentd: {e}\n"));
    }
    CheckResult {
        round,
        exit_code: out.code,
        passed: out.code == Some(0) && !out.timed_out,
        output: tail(&output, CHECK_OUTPUT_TAIL),
        duration_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
        timed_out,
    }
}

/// What follows a check: success when it passed, another round while rounds are left, else
/// failure with the last check's reason (`limit`: the check's time limit, for the message).
pub(super) fn after_check(result: &CheckResult, max_rounds: u32, limit: Duration) -> Next {
    if result.passed {
        return Next::Succeeded;
    }
    let round = result.round;
    if round < max_rounds {
        return Next::Round(round + 1);
    }
    let how = if result.timed_out {
        format!("timed out after {} s", limit.as_secs())
    } else {
        match result.exit_code {
            Some(c) => format!("exit status {c}"),
            None => "no exit status".into(),
        }
    };
    Next::Failed(format!(
        "the check still fails after {round} round{} (last: {how})",
        if round == 1 { "" } else { "s" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(code: Option<i32>, stdout: &str, timed_out: bool) -> ExecOutput {
        ExecOutput {
            code,
            stdout: stdout.as_bytes().to_vec(),
            stderr: Vec::new(),
            timed_out,
            truncated: false,
            error: None,
        }
    }

    const MIN: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn test_a_passing_check_ends_the_attempt_in_any_round() {
        let r = check_result(1, &run(Some(0), "ok\n", false), MIN, HOUR, MIN);
        assert!(r.passed && !r.timed_out);
        assert_eq!(after_check(&r, 3, MIN), Next::Succeeded);
        let r = check_result(3, &run(Some(0), "", false), MIN, HOUR, MIN);
        assert_eq!(after_check(&r, 3, MIN), Next::Succeeded);
    }

    #[test]
    fn test_a_failing_check_starts_the_next_round_until_the_last() {
        let r = check_result(1, &run(Some(1), "1 failed\n", false), MIN, HOUR, MIN);
        assert!(!r.passed);
        assert_eq!(after_check(&r, 3, MIN), Next::Round(2));
        let r = check_result(2, &run(Some(1), "", false), MIN, HOUR, MIN);
        assert_eq!(after_check(&r, 3, MIN), Next::Round(3));
        let r = check_result(3, &run(Some(2), "", false), MIN, HOUR, MIN);
        assert_eq!(
            after_check(&r, 3, MIN),
            Next::Failed("the check still fails after 3 rounds (last: exit status 2)".into())
        );
        let r = check_result(1, &run(Some(1), "", false), MIN, HOUR, MIN);
        assert_eq!(
            after_check(&r, 1, MIN),
            Next::Failed("the check still fails after 1 round (last: exit status 1)".into())
        );
    }

    /// Killed at its own limit: a timed-out check, said so in its output and the reason.
    /// Killed at the task's limit: neither (the task's timeout tells that story).
    #[test]
    fn test_timeouts_are_the_checks_own_or_the_tasks() {
        let r = check_result(1, &run(None, "working", true), MIN, HOUR, MIN);
        assert!(r.timed_out && !r.passed);
        assert!(
            r.output
                .starts_with("working\nagentd: the check timed out after 60 s"),
            "{}",
            r.output
        );
        assert_eq!(
            after_check(&r, 1, MIN),
            Next::Failed("the check still fails after 1 round (last: timed out after 60 s)".into())
        );
        let r = check_result(1, &run(None, "", true), HOUR, MIN, MIN);
        assert!(!r.timed_out && !r.passed, "{r:?}");
        assert!(!r.output.contains("timed out"), "{}", r.output);
        // Exit 0 at the moment of a kill is no pass.
        let r = check_result(1, &run(Some(0), "", true), MIN, HOUR, MIN);
        assert!(!r.passed);
    }

    #[test]
    fn test_a_lost_check_says_why_and_keeps_only_the_tail() {
        let mut out = run(None, &"x".repeat(3 * CHECK_OUTPUT_TAIL), false);
        out.error = Some("the sandbox ended".into());
        let r = check_result(2, &out, MIN, HOUR, Duration::from_millis(1500));
        assert_eq!((r.round, r.exit_code, r.duration_ms), (2, None, 1500));
        assert!(
            r.output.ends_with("agentd: the sandbox ended\n"),
            "{}",
            &r.output[r.output.len() - 40..]
        );
        assert!(
            r.output.len() <= CHECK_OUTPUT_TAIL + 64,
            "{}",
            r.output.len()
        );
        assert_eq!(
            after_check(&r, 2, MIN),
            Next::Failed("the check still fails after 2 rounds (last: no exit status)".into())
        );
    }
}
