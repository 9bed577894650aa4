//! The OpenAPI 3.1 document served at `/v1/openapi.json`, written next to the router so that
//! the two change together (a test checks every routed path is documented).

use serde_json::{json, Value};

/// Paths and their methods, as routed by `api::dispatch`.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/v1/health", &["get"]),
    ("/metrics", &["get"]),
    ("/v1/openapi.json", &["get"]),
    ("/v1/sandboxes", &["get", "post"]),
    ("/v1/sandboxes/{id}", &["get", "delete"]),
    ("/v1/sandboxes/{id}/stop", &["post"]),
    ("/v1/sandboxes/{id}/exec", &["post"]),
    ("/v1/sandboxes/{id}/logs", &["get"]),
    ("/v1/sandboxes/{id}/stats", &["get"]),
    ("/v1/sandboxes/{id}/files", &["get", "put"]),
    (
        "/v1/sandboxes/{id}/opencode/{path}",
        &["get", "post", "put", "patch", "delete"],
    ),
    ("/v1/images", &["get"]),
    ("/v1/images/pull", &["post"]),
    ("/v1/images/import", &["post"]),
    ("/v1/images/{name}", &["get", "delete"]),
    ("/v1/workspaces", &["post"]),
    ("/v1/tasks", &["get", "post"]),
    ("/v1/tasks/{id}", &["get", "delete"]),
    ("/v1/tasks/{id}/cancel", &["post"]),
    ("/v1/tasks/{id}/events", &["get"]),
    ("/v1/tasks/{id}/result", &["get"]),
    ("/v1/tasks/{id}/attempts/{n}/diff", &["get"]),
];

/// The methods routed for a request path (its segments), if any route has its shape.
pub fn allowed_methods(segs: &[&str]) -> Option<&'static [&'static str]> {
    route(segs).map(|(_, methods)| methods)
}

/// The route (its pattern and methods) a request path (its segments) has the shape of: a
/// `{name}` segment matches any one segment, a final `{path}` the rest. Metrics count
/// requests by this pattern, so arbitrary paths cannot grow their label set.
pub fn route(segs: &[&str]) -> Option<(&'static str, &'static [&'static str])> {
    ROUTES.iter().find_map(|(pattern, methods)| {
        let parts: Vec<&str> = pattern.trim_start_matches('/').split('/').collect();
        let rest_wildcard = parts.last() == Some(&"{path}");
        let fixed = if rest_wildcard {
            &parts[..parts.len() - 1]
        } else {
            &parts[..]
        };
        let shape = if rest_wildcard {
            segs.len() >= fixed.len()
        } else {
            segs.len() == fixed.len()
        };
        let matches = shape
            && fixed
                .iter()
                .zip(segs)
                .all(|(p, s)| (p.starts_with('{') && !s.is_empty()) || p == s);
        matches.then_some((*pattern, *methods))
    })
}

fn summary(path: &str, method: &str) -> &'static str {
    match (path, method) {
        ("/v1/health", _) => "Liveness and version",
        ("/metrics", _) => "Prometheus metrics (text)",
        ("/v1/openapi.json", _) => "This document",
        ("/v1/sandboxes", "get") => "List sandboxes (filter with ?label=key=value)",
        ("/v1/sandboxes", _) => "Create a sandbox; returns once it runs (state starting or ready)",
        ("/v1/sandboxes/{id}", "get") => "Inspect a sandbox (state, limits, token usage, exit)",
        ("/v1/sandboxes/{id}", _) => "Stop and forget a sandbox",
        ("/v1/sandboxes/{id}/stop", _) => "Stop a sandbox (SIGTERM, then SIGKILL after 10 s)",
        ("/v1/sandboxes/{id}/exec", _) => "Run a command; output streams as JSON lines {stream,data} while it runs, then {exit_code,timed_out,oom_killed}; with \"stdin\": true the bytes after the JSON body and a newline are its stdin; a client that disconnects kills it",
        ("/v1/sandboxes/{id}/logs", _) => "stdout/stderr as JSON lines; ?follow=true, ?stream=stdout|stderr|both",
        ("/v1/sandboxes/{id}/stats", _) => "Memory, CPU and task counts",
        ("/v1/sandboxes/{id}/files", "get") => "Download ?path= (a file, or a tar of a directory)",
        ("/v1/sandboxes/{id}/files", _) => "Upload to ?path= (a file, or with Content-Type application/x-tar a tar extracted into the directory)",
        ("/v1/sandboxes/{id}/opencode/{path}", _) => "Any request to the sandbox's OpenCode server (SSE included)",
        ("/v1/images", _) => "List images",
        ("/v1/images/pull", _) => "Pull an image; progress as JSON lines, last {event: complete|error}",
        ("/v1/images/import", _) => "Import an OCI layout or docker-archive tar: the body (Content-Type application/x-tar, ?name=), or on the Unix socket only {path} of a host file",
        ("/v1/images/{name}", "get") => "Inspect an image",
        ("/v1/images/{name}", _) => "Remove an image",
        ("/v1/workspaces", _) => "Upload a workspace tar for a task; returns {upload} for workspace.upload (one task each)",
        ("/v1/tasks", "get") => "List tasks",
        ("/v1/tasks", _) => "Create a task: prompt + workspace (path, upload or git) + agents, check, max_rounds, timeout_secs",
        ("/v1/tasks/{id}", "get") => "Inspect a task: state, counters, attempts",
        ("/v1/tasks/{id}", _) => "Delete a task, its sandboxes and results: 202 with state deleting at once (cancelled first if running), then 404 once gone; resumed after a restart",
        ("/v1/tasks/{id}/cancel", _) => "Cancel a task: sessions aborted, diffs kept, sandboxes stopped",
        ("/v1/tasks/{id}/events", _) => "Progress as server-sent events until task.finished; resume with Last-Event-ID",
        ("/v1/tasks/{id}/result", _) => "Attempts ranked (passing checks first, then smaller diffs) with messages, checks, patches, usage, timings",
        ("/v1/tasks/{id}/attempts/{n}/diff", _) => "Attempt n's patch against the baseline (text/x-diff, for git apply)",
        _ => "",
    }
}

fn params(path: &str, method: &str) -> Vec<Value> {
    let mut v: Vec<Value> = path
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "minLength": 1}}))
        .collect();
    let query = |name: &str, required: bool, schema: Value| json!({"name": name, "in": "query", "required": required, "schema": schema});
    match (path, method) {
        ("/v1/sandboxes", "get") => v.push(query("label", false, json!({"type": "string"}))),
        ("/v1/sandboxes/{id}/files", _) => v.push(query(
            "path",
            true,
            json!({"type": "string", "pattern": "^/"}),
        )),
        ("/v1/sandboxes/{id}/logs", _) => {
            v.push(query("follow", false, json!({"type": "boolean"})));
            v.push(query(
                "stream",
                false,
                json!({"type": "string", "enum": ["stdout", "stderr", "both"]}),
            ));
        }
        ("/v1/images/import", _) => v.push(query("name", false, json!({"type": "string"}))),
        ("/v1/tasks/{id}/events", _) => v.push(query(
            "after",
            false,
            json!({"type": "integer", "minimum": 0}),
        )),
        _ => {}
    }
    v
}

/// The request body of an operation, if it takes one.
fn request_body(path: &str, method: &str) -> Option<Value> {
    let json_body = |schema: Value| json!({"required": true, "content": {"application/json": {"schema": schema}}});
    let binary = json!({"type": "string", "format": "binary"});
    Some(match (path, method) {
        ("/v1/sandboxes", "post") => json_body(create_schema()),
        ("/v1/tasks", "post") => json_body(task_schema()),
        ("/v1/sandboxes/{id}/exec", _) => json_body(json!({
            "type": "object", "additionalProperties": false, "required": ["command"],
            "description": "with stdin true, the bytes after this JSON and one newline are the command's stdin",
            "properties": {
                "command": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "cwd": {"type": "string", "pattern": "^/"},
                "timeout_secs": {"type": "integer", "minimum": 1, "maximum": 86400},
                "uid": {"type": "integer", "minimum": 0},
                "stdin": {"type": "boolean", "default": false}
            }
        })),
        ("/v1/images/pull", _) => json_body(json!({
            "type": "object", "additionalProperties": false, "required": ["reference"],
            "properties": {"reference": {"type": "string", "minLength": 1}, "platform": {"type": "string"}, "insecure": {"type": "boolean"}}
        })),
        ("/v1/images/import", _) => json!({"required": true, "content": {
            "application/x-tar": {"schema": binary},
            "application/json": {"schema": {"type": "object", "additionalProperties": false, "required": ["path"],
                "description": "a host path: on the Unix socket only",
                "properties": {"path": {"type": "string"}, "name": {"type": "string"}}}}
        }}),
        ("/v1/workspaces", _) => json!({"required": true, "content": {
            "application/x-tar": {"schema": binary},
            "application/octet-stream": {"schema": binary}
        }}),
        ("/v1/sandboxes/{id}/files", "put") => json!({"required": true, "content": {
            "application/octet-stream": {"schema": binary},
            "application/x-tar": {"schema": binary}
        }}),
        _ => return None,
    })
}

/// The JSON Schema of a wire type, with nested types inlined (an OpenAPI document has no
/// `$defs` of its own to point into).
pub fn schema_of<T: schemars::JsonSchema>() -> Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .into_generator();
    let mut v = generator.into_root_schema_for::<T>().to_value();
    if let Some(o) = v.as_object_mut() {
        o.remove("$schema");
        o.remove("title");
    }
    v
}

fn create_schema() -> Value {
    schema_of::<crate::sandbox::CreateSandbox>()
}

fn task_schema() -> Value {
    schema_of::<crate::task::CreateTask>()
}

/// The document.
pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for (path, methods) in ROUTES {
        let mut item = serde_json::Map::new();
        for m in *methods {
            let mut op = json!({
                "summary": summary(path, m),
                "parameters": params(path, m),
                "responses": {
                    "200": {"description": "OK"},
                    "default": {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                }
            });
            if let Some(body) = request_body(path, m) {
                op["requestBody"] = body;
            }
            item.insert(m.to_string(), op);
        }
        paths.insert(path.to_string(), Value::Object(item));
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "agentd", "version": env!("CARGO_PKG_VERSION")},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}}}}}}
        },
        "security": [{"bearer": []}],
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_create_schema_comes_from_the_type() {
        let s = create_schema();
        eprintln!("{}", serde_json::to_string_pretty(&s).unwrap());
        assert_eq!(s["type"], "object");
        assert_eq!(s["additionalProperties"], false);
        assert!(
            s["properties"]["limits"]["properties"]["disk"].is_object(),
            "{s}"
        );
        assert!(!s.to_string().contains("$ref"), "{s}");
        assert!(s["properties"]["ttl_secs"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("Lifetime")));
    }

    #[test]
    fn test_allowed_methods() {
        assert_eq!(allowed_methods(&["v1", "health"]), Some(&["get"][..]));
        assert_eq!(
            allowed_methods(&["v1", "sandboxes", "abc", "opencode", "x", "y"]),
            Some(&["get", "post", "put", "patch", "delete"][..])
        );
        assert_eq!(
            allowed_methods(&["v1", "sandboxes", "abc", "exec"]),
            Some(&["post"][..])
        );
        assert_eq!(allowed_methods(&["v1", "nothing"]), None);
        assert_eq!(allowed_methods(&["v1", "sandboxes", ""]), None);
    }

    #[test]
    fn test_every_route_documented_with_a_summary() {
        let doc = document();
        for (path, methods) in ROUTES {
            for m in *methods {
                let s = doc["paths"][path][m]["summary"].as_str().unwrap();
                assert!(!s.is_empty(), "{m} {path} has no summary");
            }
        }
    }
}
