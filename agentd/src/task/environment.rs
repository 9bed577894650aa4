//! The repository's own environment: what a workspace says about the image and the setup
//! its agents need, in `.agentd.toml` or in a devcontainer definition
//! (`.devcontainer/devcontainer.json` or `.devcontainer.json`). Read from the workspace tar
//! agentd made or checked (regular files only, never a link; bounded size and depth); a
//! field of the request always wins.
//!
//! Honoured: `.agentd.toml` `image`, `setup`, `setup_timeout_secs`; devcontainer `image`
//! and its `onCreateCommand`, `updateContentCommand` and `postCreateCommand` (a string runs
//! in a shell, an array without one, an object's commands one after another), in that
//! order, as the setup. Named in the task's `environment.ignored` and otherwise left alone:
//! `build`/`dockerFile`/`dockerComposeFile` (agentd builds no Dockerfiles), `features`,
//! `containerEnv`/`remoteEnv`, `remoteUser`/`containerUser`, `postStartCommand`,
//! `postAttachCommand`, `forwardPorts`, `mounts`, `runArgs`.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::git::sh_quote;

/// Largest environment file read, bytes.
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// The files looked for, most preferred first.
const AGENTD_TOML: &str = ".agentd.toml";
const DEVCONTAINER: [&str; 2] = [".devcontainer/devcontainer.json", ".devcontainer.json"];

/// Devcontainer fields agentd does not act on (named in `ignored` when present).
const DEVCONTAINER_IGNORED: &[&str] = &[
    "build",
    "dockerFile",
    "dockerfile",
    "dockerComposeFile",
    "features",
    "containerEnv",
    "remoteEnv",
    "remoteUser",
    "containerUser",
    "postStartCommand",
    "postAttachCommand",
    "forwardPorts",
    "mounts",
    "runArgs",
    "initializeCommand",
];

/// What the workspace asked for, and where it said so.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Environment {
    /// The file it came from, relative to the workspace.
    pub file: String,
    /// The image it names.
    pub image: Option<String>,
    /// The setup command it defines.
    pub setup: Option<String>,
    /// The setup's time limit, seconds (`.agentd.toml` only).
    pub setup_timeout_secs: Option<u64>,
    /// Fields of the file agentd does not act on.
    #[serde(default)]
    pub ignored: Vec<String>,
}

/// Why the workspace's environment file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    /// The tar could not be read.
    #[error("failed to read the workspace: {0}")]
    Read(#[from] std::io::Error),
    /// The file is not what agentd understands.
    #[error("the workspace's {file}: {why}")]
    Invalid {
        /// The file.
        file: String,
        /// What is wrong.
        why: String,
    },
}

/// `.agentd.toml`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentdToml {
    image: Option<String>,
    setup: Option<String>,
    setup_timeout_secs: Option<u64>,
}

/// Reads the workspace tar at `tar` for its environment (`None`: it defines none).
pub fn read(tar: &Path) -> Result<Option<Environment>, EnvironmentError> {
    let mut found: Vec<(String, String)> = Vec::new();
    let mut archive = tar::Archive::new(std::io::BufReader::new(std::fs::File::open(tar)?));
    // Seeking past file contents: only the headers (and the two small files) are read,
    // not the whole workspace again.
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let name = path.trim_start_matches("./").to_string();
        if name != AGENTD_TOML && !DEVCONTAINER.contains(&name.as_str()) {
            continue;
        }
        let bad = |why: String| EnvironmentError::Invalid {
            file: name.clone(),
            why,
        };
        if !entry.header().entry_type().is_file() {
            return Err(bad(
                "is not a regular file (a link is never followed)".into()
            ));
        }
        if entry.size() > MAX_FILE_BYTES {
            return Err(bad(format!("is larger than {MAX_FILE_BYTES} bytes")));
        }
        let mut text = String::new();
        entry
            .take(MAX_FILE_BYTES)
            .read_to_string(&mut text)
            .map_err(|e| bad(format!("is not UTF-8 text ({e})")))?;
        found.push((name, text));
    }
    let pick = |file: &str| found.iter().find(|(n, _)| n == file);
    if let Some((file, text)) = pick(AGENTD_TOML) {
        return parse_agentd_toml(file, text).map(Some);
    }
    for file in DEVCONTAINER {
        if let Some((file, text)) = pick(file) {
            return parse_devcontainer(file, text).map(Some);
        }
    }
    Ok(None)
}

fn parse_agentd_toml(file: &str, text: &str) -> Result<Environment, EnvironmentError> {
    let t: AgentdToml = toml::from_str(text).map_err(|e| EnvironmentError::Invalid {
        file: file.into(),
        why: format!(
            "{} (agentd reads image, setup and setup_timeout_secs)",
            e.message()
        ),
    })?;
    Ok(Environment {
        file: file.into(),
        image: t.image,
        setup: t.setup,
        setup_timeout_secs: t.setup_timeout_secs,
        ignored: Vec::new(),
    })
}

fn parse_devcontainer(file: &str, text: &str) -> Result<Environment, EnvironmentError> {
    let bad = |why: String| EnvironmentError::Invalid {
        file: file.into(),
        why,
    };
    // JSON with comments and trailing commas; the parser bounds nesting depth.
    let ast = jsonc_parser::parse_to_ast(text, &Default::default(), &Default::default())
        .map_err(|e| bad(e.to_string()))?;
    let value = serde_json::Value::from(ast.value.ok_or_else(|| bad("is empty".into()))?);
    let obj = value
        .as_object()
        .ok_or_else(|| bad("is not a JSON object".into()))?;
    let image = match obj.get("image") {
        None => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(bad("image is not a string".into())),
    };
    let mut steps = Vec::new();
    for key in [
        "onCreateCommand",
        "updateContentCommand",
        "postCreateCommand",
    ] {
        if let Some(v) = obj.get(key) {
            steps.extend(command(v).map_err(|why| bad(format!("{key}: {why}")))?);
        }
    }
    let ignored = DEVCONTAINER_IGNORED
        .iter()
        .filter(|k| obj.contains_key(**k))
        .map(|k| (*k).to_string())
        .collect();
    Ok(Environment {
        file: file.into(),
        image,
        setup: (!steps.is_empty()).then(|| steps.join(" && ")),
        setup_timeout_secs: None,
        ignored,
    })
}

/// A devcontainer lifecycle command as shell text: a string as is, an array as one quoted
/// command, an object as its commands in order.
fn command(v: &serde_json::Value) -> Result<Vec<String>, String> {
    match v {
        serde_json::Value::String(s) if s.trim().is_empty() => Ok(Vec::new()),
        serde_json::Value::String(s) => Ok(vec![format!("{{ {s}\n}}")]),
        serde_json::Value::Array(args) => {
            let words: Option<Vec<String>> =
                args.iter().map(|a| a.as_str().map(sh_quote)).collect();
            match words {
                Some(w) if w.is_empty() => Ok(Vec::new()),
                Some(w) => Ok(vec![w.join(" ")]),
                None => Err("an array of strings was expected".into()),
            }
        }
        serde_json::Value::Object(named) => {
            let mut all = Vec::new();
            for c in named.values() {
                match c {
                    serde_json::Value::Object(_) => {
                        return Err("a command is a string or an array of strings".into())
                    }
                    other => all.extend(command(other)?),
                }
            }
            Ok(all)
        }
        _ => Err("a string, an array or an object was expected".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &str)]) -> tempfile::NamedTempFile {
        let mut b = tar::Builder::new(Vec::new());
        for (name, text) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(text.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, text.as_bytes()).unwrap();
        }
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b.into_inner().unwrap()).unwrap();
        f
    }

    #[track_caller]
    fn check(files: &[(&str, &str)], expected: Option<(&str, Option<&str>, Option<&str>)>) {
        let env = read(tar_of(files).path()).unwrap();
        let got = env
            .as_ref()
            .map(|e| (e.file.as_str(), e.image.as_deref(), e.setup.as_deref()));
        assert_eq!(got, expected, "{env:?}");
    }

    #[test]
    fn test_no_environment() {
        check(&[("README.md", "hi")], None);
    }

    #[test]
    fn test_agentd_toml() {
        check(
            &[(
                "./.agentd.toml",
                "image = \"py\"\nsetup = \"pip install -e .\"\n",
            )],
            Some((".agentd.toml", Some("py"), Some("pip install -e ."))),
        );
    }

    #[test]
    fn test_agentd_toml_wins_over_devcontainer() {
        check(
            &[
                (".devcontainer/devcontainer.json", r#"{"image": "dc"}"#),
                (".agentd.toml", "image = \"mine\""),
            ],
            Some((".agentd.toml", Some("mine"), None)),
        );
    }

    #[test]
    fn test_devcontainer_with_comments_and_every_command_form() {
        let text = r#"{
            // the team's image
            "image": "python-dev",
            "onCreateCommand": ["pip", "install", "it's"],
            "updateContentCommand": {"a": "npm ci", "b": ["make", "deps"]},
            "postCreateCommand": "pip install -e .",
            "forwardPorts": [8000],
        }"#;
        let env = read(tar_of(&[(".devcontainer/devcontainer.json", text)]).path())
            .unwrap()
            .unwrap();
        assert_eq!(env.image.as_deref(), Some("python-dev"));
        assert_eq!(
            env.setup.as_deref(),
            Some("'pip' 'install' 'it'\\''s' && { npm ci\n} && 'make' 'deps' && { pip install -e .\n}")
        );
        assert_eq!(env.ignored, ["forwardPorts"]);
        check(
            &[(".devcontainer.json", r#"{"image": "x"}"#)],
            Some((".devcontainer.json", Some("x"), None)),
        );
    }

    #[test]
    fn test_bad_files_say_what_is_wrong() {
        let err = |files: &[(&str, &str)]| read(tar_of(files).path()).unwrap_err().to_string();
        assert!(err(&[(".agentd.toml", "imag = 1")]).contains("agentd reads image, setup"));
        assert!(err(&[(".devcontainer.json", "[1]")]).contains("not a JSON object"));
        assert!(
            err(&[(".devcontainer.json", r#"{"postCreateCommand": 3}"#)])
                .contains("postCreateCommand")
        );
        let deep = format!("{{\"a\": {}{}}}", "[".repeat(5000), "]".repeat(5000));
        assert!(err(&[(".devcontainer.json", &deep)]).contains(".devcontainer.json"));
        let big = format!("# {}\n", "x".repeat(70 * 1024));
        assert!(err(&[(".agentd.toml", &big)]).contains("larger than"));
    }

    #[test]
    fn test_a_link_is_not_followed() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, ".agentd.toml", "/etc/passwd")
            .unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b.into_inner().unwrap()).unwrap();
        assert!(read(f.path())
            .unwrap_err()
            .to_string()
            .contains("not a regular file"));
    }
}
