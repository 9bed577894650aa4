//! The decisions of an attempt's rounds, as pure state the driver ([`super::TaskManager`]'s
//! `drive` and `agent_round`) follows: what each OpenCode event means for the round
//! ([`RoundWatch`]), what a check's run means ([`check_result`]) and what comes after it
//! ([`after_check`]). No I/O here, so each rule has a unit test, with OpenCode's events as
//! the JSON it sends.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::{tail, CheckResult, CHECK_OUTPUT_TAIL, MAX_TOOL_PARTS};
use crate::sandbox::ExecOutput;

/// What an OpenCode event means for the round that follows one session.
#[derive(Debug, PartialEq)]
pub(super) enum Seen {
    /// Nothing for this round (another session's event, a repeat, an event of no interest).
    Nothing,
    /// A tool call of the session changed status; `new`: the first time this call is seen
    /// (it counts once).
    Tool {
        /// First sight of this call.
        new: bool,
        /// The tool's name, as OpenCode sent it.
        tool: serde_json::Value,
        /// Its status (`pending`, `running`, `completed`, `error`).
        status: String,
        /// What it does, in at most 200 bytes.
        title: String,
        /// Once it ended: its input (JSON, at most 2 KiB) and the end of its output or
        /// error (at most 4 KiB).
        ended: Option<(serde_json::Value, String)>,
    },
    /// The agent's text grew: the new part of it (at most 16 KiB), in pieces of a line or
    /// 64 bytes at least (the rest comes with the next piece or the final message).
    Text(String),
    /// The session reported an error (its message, at most 1000 bytes).
    Error(String),
    /// The agent asks a person for a permission (`asked`), or it was answered.
    Approval {
        /// Asked (else answered).
        asked: bool,
        /// OpenCode's request id.
        id: String,
        /// What it asks for: the tool's permission (`bash`, `edit`, ...) and its patterns (at
        /// most 10, 200 bytes each), or the reply.
        what: serde_json::Value,
    },
    /// The session is idle: the round's agent work is done.
    Idle,
}

/// The tool calls of one round seen so far, bounded by [`MAX_TOOL_PARTS`]: a hostile
/// OpenCode cannot make agentd remember without end.
pub(super) struct RoundWatch {
    session: String,
    /// Each text part's bytes already reported.
    texts: HashMap<String, usize>,
    /// Each call's last status.
    tools: HashMap<String, String>,
    /// Calls counted.
    counted: HashSet<String>,
}

impl RoundWatch {
    /// A watch of `session`'s events.
    pub(super) fn new(session: &str) -> RoundWatch {
        RoundWatch {
            session: session.to_string(),
            texts: HashMap::new(),
            tools: HashMap::new(),
            counted: HashSet::new(),
        }
    }

    /// What `ev` (one event of OpenCode's `/event` stream) means.
    pub(super) fn see(&mut self, ev: &serde_json::Value) -> Seen {
        let props = &ev["properties"];
        let ours = |v: &serde_json::Value| v.as_str() == Some(self.session.as_str());
        match ev["type"].as_str().unwrap_or_default() {
            "message.part.updated"
                if ours(&props["part"]["sessionID"]) && props["part"]["type"] == "text" =>
            {
                let part = &props["part"];
                let id = part["id"].as_str().unwrap_or_default().to_string();
                let text = part["text"].as_str().unwrap_or_default();
                if !self.texts.contains_key(&id) && self.texts.len() >= MAX_TOOL_PARTS {
                    return Seen::Nothing;
                }
                let done = self.texts.get(&id).copied().unwrap_or(0);
                let Some(new) = text.get(done..) else {
                    return Seen::Nothing;
                };
                let ended = part["time"]["end"].is_number();
                if new.is_empty() || (new.len() < 64 && !new.contains('\n') && !ended) {
                    return Seen::Nothing;
                }
                self.texts.insert(id, text.len());
                let mut piece = new.to_string();
                if piece.len() > 16 * 1024 {
                    piece = tail(&piece, 16 * 1024);
                }
                Seen::Text(piece)
            }
            "message.part.updated" => {
                let part = &props["part"];
                if !ours(&part["sessionID"]) || part["type"] != "tool" {
                    return Seen::Nothing;
                }
                let id = part["id"].as_str().unwrap_or_default().to_string();
                let status = part["state"]["status"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if self.tools.get(&id) == Some(&status)
                    || (!self.tools.contains_key(&id) && self.tools.len() >= MAX_TOOL_PARTS)
                {
                    return Seen::Nothing;
                }
                self.tools.insert(id.clone(), status.clone());
                let title = part["state"]["title"]
                    .as_str()
                    .or_else(|| part["state"]["input"]["description"].as_str())
                    .unwrap_or_default();
                let ended = matches!(status.as_str(), "completed" | "error").then(|| {
                    let input = &part["state"]["input"];
                    let input_text = input.to_string();
                    let input = if input_text.len() <= 2048 {
                        input.clone()
                    } else {
                        serde_json::Value::String(tail(&input_text, 2048))
                    };
                    let output = part["state"]["output"]
                        .as_str()
                        .or_else(|| part["state"]["error"].as_str())
                        .unwrap_or_default();
                    (input, tail(output, 4096))
                });
                Seen::Tool {
                    new: self.counted.insert(id),
                    tool: part["tool"].clone(),
                    status,
                    title: tail(title, 200),
                    ended,
                }
            }
            // An error that names no session is the server's, so this session's too.
            "session.error"
                if props["sessionID"]
                    .as_str()
                    .is_none_or(|s| s == self.session) =>
            {
                let e = &props["error"];
                let msg = e["data"]["message"]
                    .as_str()
                    .or_else(|| e["name"].as_str())
                    .unwrap_or("unknown error");
                Seen::Error(tail(msg, 1000))
            }
            "permission.asked" if ours(&props["sessionID"]) => Seen::Approval {
                asked: true,
                id: tail(props["id"].as_str().unwrap_or_default(), 100),
                what: serde_json::json!({
                    "permission": tail(props["permission"].as_str().unwrap_or_default(), 100),
                    "patterns": props["patterns"]
                        .as_array()
                        .map(|p| {
                            p.iter()
                                .take(10)
                                .map(|s| tail(s.as_str().unwrap_or_default(), 200))
                                .collect::<Vec<_>>()
                        })
                        .unwrap_or_default(),
                }),
            },
            "permission.replied" if ours(&props["sessionID"]) => Seen::Approval {
                asked: false,
                id: tail(props["requestID"].as_str().unwrap_or_default(), 100),
                what: serde_json::json!({
                    "reply": tail(props["reply"].as_str().unwrap_or_default(), 20),
                }),
            },
            "session.idle" if ours(&props["sessionID"]) => Seen::Idle,
            "session.status" if ours(&props["sessionID"]) && props["status"]["type"] == "idle" => {
                Seen::Idle
            }
            _ => Seen::Nothing,
        }
    }
}

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

/// The result of round `round`'s check (or of the setup, `what`) from its run: `limit` is
/// the command's own time limit, `left` what was left of the task's (the run was killed at
/// the smaller one), `took` how long it ran. A run killed at the task's limit is not "timed
/// out" (the task's timeout handles that); its output says why it ended, never more than
/// the tail agentd keeps.
pub(super) fn check_result(
    what: &str,
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
            "agentd: the {what} timed out after {} s and was killed\n",
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
    let how = crate::sandbox::how_it_ended(result.timed_out, result.exit_code, limit);
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

    /// A tool part event as OpenCode sends it.
    fn tool(session: &str, id: &str, status: &str) -> serde_json::Value {
        serde_json::json!({"type": "message.part.updated", "properties": {"part": {
            "id": id, "sessionID": session, "type": "tool", "tool": "bash",
            "state": {"status": status, "input": {"description": "runs the tests"}}
        }}})
    }

    /// A session's tool calls count once each however often their status changes; repeats,
    /// other sessions' events and other part types count nothing.
    #[test]
    fn test_tool_calls_count_once_per_call() {
        let mut w = RoundWatch::new("s1");
        let seen = |w: &mut RoundWatch, ev| match w.see(&ev) {
            Seen::Tool {
                new, status, title, ..
            } => Some((new, status, title)),
            Seen::Nothing => None,
            other => panic!("{other:?}"),
        };
        let t = || "runs the tests".to_string();
        assert_eq!(
            seen(&mut w, tool("s1", "p1", "pending")),
            Some((true, "pending".into(), t()))
        );
        assert_eq!(seen(&mut w, tool("s1", "p1", "pending")), None, "a repeat");
        assert_eq!(
            seen(&mut w, tool("s1", "p1", "running")),
            Some((false, "running".into(), t()))
        );
        assert_eq!(
            seen(&mut w, tool("s1", "p1", "completed")),
            Some((false, "completed".into(), t()))
        );
        assert_eq!(
            seen(&mut w, tool("s2", "p9", "pending")),
            None,
            "another session"
        );
        let mut text = tool("s1", "p2", "pending");
        text["properties"]["part"]["type"] = "text".into();
        assert_eq!(seen(&mut w, text), None, "not a tool");
        assert_eq!(
            seen(&mut w, tool("s1", "p2", "running")).map(|s| s.0),
            Some(true)
        );
    }

    /// The agent's text comes in pieces (a line, or 64 bytes, or the part's end), each once;
    /// an ended tool call carries its input and the end of its output.
    #[test]
    fn test_text_pieces_and_tool_results() {
        let mut w = RoundWatch::new("s1");
        let text = |t: &str, end: bool| {
            let mut p = serde_json::json!({"id": "t1", "sessionID": "s1", "type": "text", "text": t, "time": {"start": 1}});
            if end {
                p["time"]["end"] = 2.into();
            }
            serde_json::json!({"type": "message.part.updated", "properties": {"part": p}})
        };
        assert_eq!(w.see(&text("Look", false)), Seen::Nothing);
        assert_eq!(
            w.see(&text("Looking at it\n", false)),
            Seen::Text("Looking at it\n".into())
        );
        assert_eq!(w.see(&text("Looking at it\nDone", false)), Seen::Nothing);
        assert_eq!(
            w.see(&text("Looking at it\nDone.", true)),
            Seen::Text("Done.".into())
        );
        let mut done = tool("s1", "p1", "completed");
        done["properties"]["part"]["state"]["output"] = "x".repeat(10_000).into();
        match w.see(&done) {
            Seen::Tool {
                ended: Some((input, output)),
                ..
            } => {
                assert_eq!(input["description"], "runs the tests");
                assert!(output.len() <= 4096);
            }
            other => panic!("{other:?}"),
        }
    }

    /// OpenCode's permission requests of the session (and their answers) are approvals, with
    /// what they ask for capped; another session's are not.
    #[test]
    fn test_permission_requests_are_approvals() {
        let mut w = RoundWatch::new("s1");
        let asked = |session: &str| {
            serde_json::json!({"type": "permission.asked", "properties": {
                "id": "per_1", "sessionID": session, "permission": "bash",
                "patterns": ["echo hi", "x".repeat(5000)], "metadata": {}, "always": []}})
        };
        match w.see(&asked("s1")) {
            Seen::Approval { asked, id, what } => {
                assert!(asked);
                assert_eq!(id, "per_1");
                assert_eq!(what["permission"], "bash");
                assert_eq!(what["patterns"][0], "echo hi");
                assert!(what["patterns"][1].as_str().unwrap().len() <= 200);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(w.see(&asked("s2")), Seen::Nothing);
        let replied = serde_json::json!({"type": "permission.replied", "properties": {
            "sessionID": "s1", "requestID": "per_1", "reply": "once"}});
        assert_eq!(
            w.see(&replied),
            Seen::Approval {
                asked: false,
                id: "per_1".into(),
                what: serde_json::json!({"reply": "once"})
            }
        );
    }

    /// Past MAX_TOOL_PARTS distinct calls, new ones are neither remembered nor counted; the
    /// known ones still report their status.
    #[test]
    fn test_tool_calls_are_bounded() {
        let mut w = RoundWatch::new("s");
        for i in 0..MAX_TOOL_PARTS {
            assert!(matches!(
                w.see(&tool("s", &format!("p{i}"), "running")),
                Seen::Tool { new: true, .. }
            ));
        }
        assert_eq!(w.see(&tool("s", "one-more", "running")), Seen::Nothing);
        assert!(matches!(
            w.see(&tool("s", "p0", "completed")),
            Seen::Tool { new: false, .. }
        ));
        assert_eq!(w.tools.len(), MAX_TOOL_PARTS);
    }

    /// The round ends on its session's idle (either event OpenCode sends for it); errors of
    /// the session, or of no session, are the round's; another session's are not.
    #[test]
    fn test_idle_and_errors_of_the_session() {
        let mut w = RoundWatch::new("s1");
        let ev =
            |t: &str, props: serde_json::Value| serde_json::json!({"type": t, "properties": props});
        assert_eq!(
            w.see(&ev("session.idle", serde_json::json!({"sessionID": "s2"}))),
            Seen::Nothing
        );
        assert_eq!(
            w.see(&ev("session.idle", serde_json::json!({"sessionID": "s1"}))),
            Seen::Idle
        );
        assert_eq!(
            w.see(&ev(
                "session.status",
                serde_json::json!({"sessionID": "s1", "status": {"type": "busy"}})
            )),
            Seen::Nothing
        );
        assert_eq!(
            w.see(&ev(
                "session.status",
                serde_json::json!({"sessionID": "s1", "status": {"type": "idle"}})
            )),
            Seen::Idle
        );
        let error = serde_json::json!({"name": "ProviderAuthError", "data": {"message": "no key"}});
        assert_eq!(
            w.see(&ev(
                "session.error",
                serde_json::json!({"sessionID": "s1", "error": error})
            )),
            Seen::Error("no key".into())
        );
        assert_eq!(
            w.see(&ev(
                "session.error",
                serde_json::json!({"error": {"name": "UnknownError"}})
            )),
            Seen::Error("UnknownError".into())
        );
        assert_eq!(
            w.see(&ev(
                "session.error",
                serde_json::json!({"sessionID": "s2", "error": error})
            )),
            Seen::Nothing
        );
        let long = "e".repeat(5000);
        match w.see(&ev(
            "session.error",
            serde_json::json!({"sessionID": "s1", "error": {"data": {"message": long}}}),
        )) {
            Seen::Error(m) => assert_eq!(m.len(), 1000),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            w.see(&serde_json::json!({"type": "server.connected"})),
            Seen::Nothing
        );
        assert_eq!(w.see(&serde_json::json!("not an object")), Seen::Nothing);
    }

    const MIN: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn test_a_passing_check_ends_the_attempt_in_any_round() {
        let r = check_result("check", 1, &run(Some(0), "ok\n", false), MIN, HOUR, MIN);
        assert!(r.passed && !r.timed_out);
        assert_eq!(after_check(&r, 3, MIN), Next::Succeeded);
        let r = check_result("check", 3, &run(Some(0), "", false), MIN, HOUR, MIN);
        assert_eq!(after_check(&r, 3, MIN), Next::Succeeded);
    }

    #[test]
    fn test_a_failing_check_starts_the_next_round_until_the_last() {
        let r = check_result(
            "check",
            1,
            &run(Some(1), "1 failed\n", false),
            MIN,
            HOUR,
            MIN,
        );
        assert!(!r.passed);
        assert_eq!(after_check(&r, 3, MIN), Next::Round(2));
        let r = check_result("check", 2, &run(Some(1), "", false), MIN, HOUR, MIN);
        assert_eq!(after_check(&r, 3, MIN), Next::Round(3));
        let r = check_result("check", 3, &run(Some(2), "", false), MIN, HOUR, MIN);
        assert_eq!(
            after_check(&r, 3, MIN),
            Next::Failed("the check still fails after 3 rounds (last: exit status 2)".into())
        );
        let r = check_result("check", 1, &run(Some(1), "", false), MIN, HOUR, MIN);
        assert_eq!(
            after_check(&r, 1, MIN),
            Next::Failed("the check still fails after 1 round (last: exit status 1)".into())
        );
    }

    /// Killed at its own limit: a timed-out check, said so in its output and the reason.
    /// Killed at the task's limit: neither (the task's timeout tells that story).
    #[test]
    fn test_timeouts_are_the_checks_own_or_the_tasks() {
        let r = check_result("check", 1, &run(None, "working", true), MIN, HOUR, MIN);
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
        let r = check_result("check", 1, &run(None, "", true), HOUR, MIN, MIN);
        assert!(!r.timed_out && !r.passed, "{r:?}");
        assert!(!r.output.contains("timed out"), "{}", r.output);
        // Exit 0 at the moment of a kill is no pass.
        let r = check_result("check", 1, &run(Some(0), "", true), MIN, HOUR, MIN);
        assert!(!r.passed);
    }

    #[test]
    fn test_a_lost_check_says_why_and_keeps_only_the_tail() {
        let mut out = run(None, &"x".repeat(3 * CHECK_OUTPUT_TAIL), false);
        out.error = Some("the sandbox ended".into());
        let r = check_result("check", 2, &out, MIN, HOUR, Duration::from_millis(1500));
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
