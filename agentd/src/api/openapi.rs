//! The OpenAPI 3.1 document served at `/v1/openapi.json`. Its operations are the router's
//! ([`super::routes::ROUTES`]); request bodies come from the wire types' schemas.

use serde_json::{json, Value};

use super::routes::{Route, ROUTES};

/// An operation's parameters: its path's `{name}`s, then its query type's properties.
fn params(route: &Route) -> Vec<Value> {
    let path = route.doc_path();
    let mut v: Vec<Value> = path
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "minLength": 1}}))
        .collect();
    if let Some(query) = route.query {
        let schema = query();
        let required: Vec<&str> = schema["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(props) = schema["properties"].as_object() {
            for (name, s) in props {
                let mut s = s.clone();
                let description = s
                    .as_object_mut()
                    .and_then(|o| o.remove("description"))
                    .unwrap_or(Value::Null);
                let mut p = json!({"name": name, "in": "query", "required": required.contains(&name.as_str()), "schema": s});
                if !description.is_null() {
                    p["description"] = description;
                }
                v.push(p);
            }
        }
    }
    v
}

/// Media types and their schemas as an OpenAPI `content` object.
fn content(types: &[(&str, super::routes::Schema)]) -> Value {
    let mut c = serde_json::Map::new();
    for (media, schema) in types {
        c.insert(media.to_string(), json!({"schema": schema()}));
    }
    Value::Object(c)
}

/// Any JSON object.
pub(crate) fn any_object() -> Value {
    json!({"type": "object"})
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

/// `GET /v1/openapi.json`.
pub(crate) async fn serve() -> axum::response::Response<super::Body> {
    super::json(hyper::StatusCode::OK, &document())
}

/// The document.
pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for route in ROUTES {
        let mut success = json!({"description": "Success"});
        if !route.output.is_empty() {
            success["content"] = content(route.output);
        }
        let mut op = json!({
            "summary": route.summary,
            "parameters": params(route),
            "responses": {
                route.status.to_string(): success,
                "default": {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }
        });
        if !route.input.is_empty() {
            op["requestBody"] = json!({"required": true, "content": content(route.input)});
        }
        let item = paths
            .entry(route.doc_path())
            .or_insert_with(|| Value::Object(Default::default()));
        item[route.method.to_ascii_lowercase()] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "agentd", "version": env!("CARGO_PKG_VERSION")},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": schema_of::<super::types::ErrorBody>()}
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
        let s = schema_of::<crate::sandbox::CreateSandbox>();
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
    fn test_every_route_documented_with_a_summary() {
        let doc = document();
        for route in ROUTES {
            let m = route.method.to_ascii_lowercase();
            let s = doc["paths"][route.doc_path()][&m]["summary"]
                .as_str()
                .unwrap();
            assert!(!s.is_empty(), "{m} {} has no summary", route.path);
        }
        let ops: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum();
        assert_eq!(ops, ROUTES.len(), "an operation is listed twice");
    }

    #[test]
    fn test_bodies_parameters_and_answers_come_from_the_types() {
        let doc = document();
        let exec = &doc["paths"]["/v1/sandboxes/{id}/exec"]["post"];
        let body = &exec["requestBody"]["content"]["application/json"]["schema"];
        assert_eq!(body["additionalProperties"], false, "{body}");
        assert_eq!(body["properties"]["command"]["minItems"], 1, "{body}");
        assert_eq!(body["properties"]["cwd"]["pattern"], "^/", "{body}");
        assert_eq!(
            body["properties"]["timeout_secs"]["maximum"], 86400,
            "{body}"
        );
        let line = &exec["responses"]["200"]["content"]["application/x-ndjson"]["schema"];
        assert!(line["properties"]["exit_code"].is_object(), "{line}");
        let files = &doc["paths"]["/v1/sandboxes/{id}/files"]["get"]["parameters"];
        let path = files
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "path" && p["in"] == "query")
            .unwrap_or_else(|| panic!("{files}"));
        assert_eq!(path["required"], true);
        let create = &doc["paths"]["/v1/sandboxes"]["post"]["responses"]["201"];
        let view = &create["content"]["application/json"]["schema"];
        assert!(
            view["required"]
                .as_array()
                .unwrap()
                .contains(&json!("state")),
            "{view}"
        );
        assert!(doc["paths"]["/v1/sandboxes/{id}"]["delete"]["responses"]["204"].is_object());
        assert!(
            !doc.to_string().contains("$defs"),
            "nested types are inlined"
        );
    }

    /// Routes that overlap, or a path axum refuses, panic here rather than at start.
    #[test]
    fn test_router_builds() {
        let _ = super::super::routes::router();
    }
}
