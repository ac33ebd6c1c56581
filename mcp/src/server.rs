//! Messages from the server to the client: JSON response bodies and the data of SSE `message`
//! events. They are read for three things: the audit log (which call a result answers, whether
//! it is an error, server requests and notifications), the visibility rule (tools the policy
//! hides are removed from `tools/list` results), and cache hints of filtered listings.
//!
//! Reading is as strict as for requests: a listing with duplicate keys could show the client
//! another list than the one filtered here, so such a listing is not forwarded.

use serde_json::{Map, Value};

use mcpwarden_json::{self as strict, write_value};

use super::{error_response, Kind, INTERNAL_ERROR};

/// What one server message is.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerMessage {
    pub kind: Kind,
    /// Responses and server requests.
    pub id: Option<Value>,
    /// Server requests and notifications.
    pub method: Option<String>,
    /// A result with `isError: true`, or a JSON-RPC error.
    pub is_error: bool,
    /// The code of a JSON-RPC error.
    pub error_code: Option<i64>,
    /// `result.resultType` (2026-07-28: `complete` or `input_required`).
    pub result_type: Option<String>,
    /// `params.requestId` of `notifications/cancelled`.
    pub cancels: Option<Value>,
    /// `result.protocolVersion` of an initialize result.
    pub protocol_version: Option<String>,
}

/// How a `tools/list` result was changed for this caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filtered {
    /// Names removed, in order.
    pub removed: Vec<String>,
}

/// The longest a filtered 2026-07-28 listing may be cached: a policy change shows within this.
pub const FILTERED_TTL_CAP_MS: u64 = 60_000;

/// What to do with the listings in a server message.
pub struct ListingRule<'a> {
    /// Whether a tool may be shown.
    pub visible: &'a dyn Fn(&str) -> bool,
    /// The ids of this exchange's `tools/list` requests: their results are listings whatever
    /// they look like. A result with another id is treated as a listing when it has the shape
    /// of one (`result.tools` an array of objects with string names).
    pub listing_ids: &'a [Value],
    /// The caller's listings are per-caller (the policy hides something): 2026-07-28 results
    /// are marked `cacheScope: "private"` and their `ttlMs` capped.
    pub per_caller: bool,
}

/// A server message body read, and the bytes to send the client.
#[derive(Debug)]
pub struct Inspected {
    pub messages: Vec<ServerMessage>,
    /// Listings filtered, with the ids of their responses.
    pub filtered: Vec<(Value, Filtered)>,
    /// `None`: forward the original bytes. `Some`: send these instead (a listing was changed,
    /// or could not be read and was replaced by an error).
    pub rewritten: Option<Vec<u8>>,
    /// `Mcp-Param-*` designations of every tool in the listings read (before filtering).
    pub designations: Vec<(String, Vec<super::Designation>)>,
    /// Why the body could not be read as JSON-RPC (it is forwarded as it is unless the exchange
    /// expects a listing in it, which is then answered with an error; the audit notes it).
    pub unreadable: Option<String>,
}

/// Reads a server message body (an object or a batch array) and applies the visibility rule
/// to every listing in it.
pub fn inspect(text: &str, rule: &ListingRule<'_>) -> Inspected {
    let mut out = Inspected {
        messages: Vec::new(),
        filtered: Vec::new(),
        designations: Vec::new(),
        rewritten: None,
        unreadable: None,
    };
    let document = match strict::parse(text) {
        Ok(d) => d,
        Err(e) => {
            out.unreadable = Some(format!("not JSON: {e}"));
            // A client's parser may read what the strict one refuses (`1e400`, `NaN`): an
            // answer this exchange expects a listing in cannot be checked, so it is replaced.
            out.rewritten = unreadable_listings(rule.listing_ids);
            return out;
        }
    };
    let mut value = document.value;
    let mut changed = false;
    {
        let objects: Vec<&mut Map<String, Value>> = match &mut value {
            Value::Object(o) => vec![o],
            Value::Array(items) => items.iter_mut().filter_map(Value::as_object_mut).collect(),
            _ => Vec::new(),
        };
        if objects.is_empty() {
            out.unreadable = Some("not a JSON-RPC message".into());
            return out;
        }
        for object in objects {
            let message = read(object);
            if message.kind == Kind::Response {
                // An answer with a null or no id is one a lenient client may still take up
                // (read as id 0, the first id some clients use): its listing is read and
                // filtered like any other (`message.id` leaves it out of correlation).
                {
                    let id = object.get("id").cloned().unwrap_or(Value::Null);
                    let listing_id = rule.listing_ids.contains(&id);
                    let folded = folded_listing(object, listing_id);
                    let listing = listing_id || looks_like_listing(object) || folded;
                    if listing {
                        collect_designations(object, &mut out.designations);
                        if folded {
                            *object = error_object(
                                &id,
                                "mcpwarden could not read the server's tools/list result unambiguously (a key that is a member only when case-folded); it was not forwarded",
                            );
                            changed = true;
                        } else if document.clash.is_some() {
                            // Another reader may see another list: replace it with an error.
                            *object = error_object(
                                &id,
                                "mcpwarden could not read the server's tools/list result unambiguously (duplicate keys); it was not forwarded",
                            );
                            changed = true;
                        } else if let Some(f) = filter_listing(object, rule) {
                            changed = true;
                            out.filtered.push((id, f));
                        }
                    }
                }
            }
            out.messages.push(message);
        }
    }
    if changed {
        let mut text = String::with_capacity(text.len());
        write_value(&value, &mut text);
        out.rewritten = Some(text.into_bytes());
    }
    out
}

/// Whether a client matching keys ignoring case (Go's `encoding/json`) could read a listing in
/// this response that the filter does not see: `result.Tools` (any key folding to `tools`
/// but `tools`), or a `Result` (any key folding to `result` but `result`) that holds such a
/// key or answers a listing request (`listing_id`).
pub(crate) fn folded_listing(object: &Map<String, Value>, listing_id: bool) -> bool {
    let folds_to = |key: &str, field: &str| strict::fold_key(key) == field;
    let has_tools = |v: &Value| {
        v.as_object()
            .is_some_and(|r| r.keys().any(|k| folds_to(k, "tools")))
    };
    let tools_alias = object
        .get("result")
        .and_then(Value::as_object)
        .is_some_and(|r| r.keys().any(|k| k != "tools" && folds_to(k, "tools")));
    tools_alias
        || object
            .iter()
            .any(|(k, v)| k != "result" && folds_to(k, "result") && (listing_id || has_tools(v)))
}

/// For a body that could not be read: an error answer to each listing the exchange expects
/// (one object, or an array for several), or `None` when it expects none.
fn unreadable_listings(ids: &[Value]) -> Option<Vec<u8>> {
    const WHY: &str = "mcpwarden could not read the server's tools/list result (not strict JSON); it was not forwarded";
    match ids {
        [] => None,
        [one] => Some(error_response(Some(one), INTERNAL_ERROR, WHY)),
        many => {
            let errors: Vec<Value> = many
                .iter()
                .map(|id| Value::Object(error_object(id, WHY)))
                .collect();
            let mut text = String::new();
            write_value(&Value::Array(errors), &mut text);
            Some(text.into_bytes())
        }
    }
}

fn error_object(id: &Value, message: &str) -> Map<String, Value> {
    match serde_json::from_slice(&error_response(Some(id), INTERNAL_ERROR, message)) {
        Ok(Value::Object(o)) => o,
        _ => Map::new(),
    }
}

fn collect_designations(
    object: &Map<String, Value>,
    out: &mut Vec<(String, Vec<super::Designation>)>,
) {
    let Some(Value::Array(tools)) = object.get("result").and_then(|r| r.get("tools")) else {
        return;
    };
    for tool in tools {
        if let Some(name) = tool.get("name").and_then(Value::as_str) {
            out.push((name.to_owned(), super::designations(tool)));
        }
    }
}

/// `result.tools` is an array of objects that all have a string `name`.
fn looks_like_listing(object: &Map<String, Value>) -> bool {
    match object.get("result").and_then(|r| r.get("tools")) {
        Some(Value::Array(tools)) => tools
            .iter()
            .all(|t| t.get("name").is_some_and(Value::is_string)),
        _ => false,
    }
}

/// Removes tools the caller may not see; entries without a string name are removed too (they
/// cannot be judged). Returns `None` when nothing needed changing.
fn filter_listing(object: &mut Map<String, Value>, rule: &ListingRule<'_>) -> Option<Filtered> {
    let result = object.get_mut("result")?.as_object_mut()?;
    let mut filtered = Filtered::default();
    let mut changed = false;
    if let Some(Value::Array(tools)) = result.get_mut("tools") {
        tools.retain(|tool| match tool.get("name").and_then(Value::as_str) {
            Some(name) if (rule.visible)(name) => true,
            Some(name) => {
                filtered.removed.push(name.to_owned());
                false
            }
            None => {
                filtered.removed.push(String::new());
                false
            }
        });
        changed = !filtered.removed.is_empty();
    }
    // Keys are compared as a case-insensitive client (Go's encoding/json) compares them.
    let is = |key: &str, field: &str| strict::fold_key(key) == strict::fold_key(field);
    let revision_2026 = result.keys().any(|k| {
        ["resultType", "cacheScope", "ttlMs"]
            .iter()
            .any(|f| is(k, f))
    });
    if rule.per_caller && revision_2026 {
        // A key such a client reads as one of the hints (`cacheSCope`, `ttlMſ`) goes, so that
        // the hints written here are the only ones it can read (found by the server_message
        // fuzz target: the written `cacheScope` sat beside a `cacheSCope`).
        let before = result.len();
        result.retain(|k, _| !["cacheScope", "ttlMs"].iter().any(|f| k != f && is(k, f)));
        changed |= result.len() != before;
        if result.get("cacheScope").and_then(Value::as_str) != Some("private") {
            result.insert("cacheScope".into(), Value::from("private"));
            changed = true;
        }
        if let Some(ttl) = result.get("ttlMs") {
            let capped = ttl.as_u64().map_or(0, |t| t.min(FILTERED_TTL_CAP_MS));
            if ttl.as_u64() != Some(capped) {
                result.insert("ttlMs".into(), Value::from(capped));
                changed = true;
            }
        } else {
            result.insert("ttlMs".into(), Value::from(0u64));
            changed = true;
        }
    }
    changed.then_some(filtered)
}

/// Reads one message object leniently (the server's own format errors are the client's to
/// judge): what it is, and the fields the audit log records.
fn read(object: &Map<String, Value>) -> ServerMessage {
    let id = object.get("id").filter(|v| !v.is_null()).cloned();
    let method = object
        .get("method")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let kind = match (&method, &id) {
        (Some(_), Some(_)) => Kind::Request,
        (Some(_), None) => Kind::Notification,
        (None, _) => Kind::Response,
    };
    let result = object.get("result");
    let error_code = object
        .get("error")
        .and_then(|e| e.get("code"))
        .and_then(Value::as_i64);
    let is_error = object.contains_key("error")
        || result
            .and_then(|r| r.get("isError"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
    let cancels = (method.as_deref() == Some("notifications/cancelled"))
        .then(|| {
            object
                .get("params")
                .and_then(|p| p.get("requestId"))
                .cloned()
        })
        .flatten();
    ServerMessage {
        kind,
        id,
        method,
        is_error: kind == Kind::Response && is_error,
        error_code,
        result_type: result
            .and_then(|r| r.get("resultType"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        cancels,
        protocol_version: result
            .and_then(|r| r.get("protocolVersion"))
            .and_then(Value::as_str)
            .map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn visible(name: &str) -> bool {
        name != "secret"
    }

    fn rule<'a>(ids: &'a [Value], per_caller: bool) -> ListingRule<'a> {
        ListingRule {
            visible: &visible,
            listing_ids: ids,
            per_caller,
        }
    }

    #[test]
    fn a_listing_a_lenient_client_could_read_otherwise_is_replaced() {
        let visible = |name: &str| name != "secret";
        let rule = ListingRule {
            visible: &visible,
            listing_ids: &[json!(4)],
            per_caller: true,
        };
        // Not strict JSON, though JavaScript's JSON.parse reads 1e400 as Infinity.
        let text = r#"{"jsonrpc":"2.0","id":4,"result":{"tools":[{"name":"secret","n":1e400}]}}"#;
        let out = inspect(text, &rule);
        assert!(out.unreadable.is_some());
        let sent: Value = serde_json::from_slice(&out.rewritten.expect("replaced")).expect("JSON");
        assert_eq!(sent["id"], 4);
        assert!(sent["error"].is_object(), "{sent}");
        // `Tools` (Go binds it to `tools`), for this id or any other.
        for text in [
            r#"{"jsonrpc":"2.0","id":4,"result":{"Tools":[{"name":"secret"}]}}"#,
            r#"{"jsonrpc":"2.0","id":9,"result":{"toolſ":[{"name":"secret"}]}}"#,
            r#"{"jsonrpc":"2.0","id":4,"Result":{"tools":[{"name":"secret"}]}}"#,
        ] {
            let out = inspect(text, &rule);
            let sent: Value =
                serde_json::from_slice(&out.rewritten.expect("replaced")).expect("JSON");
            assert!(
                sent["error"].is_object() && !sent.to_string().contains("secret"),
                "{text}: {sent}"
            );
        }
        // Unreadable, but no listing expected: forwarded as it is.
        let none = ListingRule {
            listing_ids: &[],
            ..rule
        };
        assert!(
            inspect("{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":NaN}", &none)
                .rewritten
                .is_none()
        );
    }

    #[test]
    fn listing_is_filtered_and_other_bytes_untouched() {
        let text = r#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"echo","inputSchema":{}},{"name":"secret"}],"nextCursor":"c"}}"#;
        let ids = [json!(2)];
        let got = inspect(text, &rule(&ids, true));
        let out: Value = serde_json::from_slice(got.rewritten.as_ref().unwrap()).unwrap();
        assert_eq!(
            out,
            json!({"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"echo","inputSchema":{}}],"nextCursor":"c"}})
        );
        assert_eq!(got.filtered[0].1.removed, vec!["secret".to_owned()]);

        let clean = r#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"echo"}]}}"#;
        assert!(inspect(clean, &rule(&ids, true)).rewritten.is_none());
        let call = r#"{"jsonrpc":"2.0","id":3,"result":{"content":[],"isError":true}}"#;
        let got = inspect(call, &rule(&ids, true));
        assert!(got.rewritten.is_none());
        assert!(got.messages[0].is_error);
    }

    #[test]
    fn listing_shape_is_filtered_even_for_an_unknown_id() {
        let text = r#"{"jsonrpc":"2.0","id":"x","result":{"tools":[{"name":"secret"}]}}"#;
        assert!(inspect(text, &rule(&[], false)).rewritten.is_some());
    }

    #[test]
    fn stateless_listing_becomes_private_with_capped_ttl() {
        let text = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"echo"}],"resultType":"complete","ttlMs":300000,"cacheScope":"public"}}"#;
        let ids = [json!(1)];
        let got = inspect(text, &rule(&ids, true));
        let out: Value = serde_json::from_slice(got.rewritten.as_ref().unwrap()).unwrap();
        assert_eq!(out["result"]["cacheScope"], "private");
        assert_eq!(out["result"]["ttlMs"], FILTERED_TTL_CAP_MS);
        // A policy that hides nothing leaves the hints alone.
        assert!(inspect(text, &rule(&ids, false)).rewritten.is_none());
    }

    #[test]
    fn cache_hints_spelt_in_another_case_are_replaced_not_doubled() {
        let text = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[],"resultTYPE":"complete","cacheSCope":"public","ttlM\u017f":300000}}"#;
        let ids = [json!(1)];
        let got = inspect(text, &rule(&ids, true));
        let out: Value = serde_json::from_slice(got.rewritten.as_ref().unwrap()).unwrap();
        assert_eq!(
            out["result"],
            json!({"tools":[],"resultTYPE":"complete","cacheScope":"private","ttlMs":0}),
        );
    }

    #[test]
    fn duplicate_keys_in_a_listing_replace_it_with_an_error() {
        let text = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"secret"}],"tools":[]}}"#;
        let ids = [json!(1)];
        let got = inspect(text, &rule(&ids, false));
        let out: Value = serde_json::from_slice(got.rewritten.as_ref().unwrap()).unwrap();
        assert!(out.get("result").is_none(), "{out}");
        assert!(out["error"]["message"]
            .as_str()
            .unwrap()
            .contains("duplicate"));
    }

    #[test]
    fn batches_server_requests_notifications_and_errors() {
        let text = r#"[{"jsonrpc":"2.0","id":1,"error":{"code":-32001,"message":"boom"}},
            {"jsonrpc":"2.0","id":"s1","method":"ping"},
            {"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":4}},
            {"jsonrpc":"2.0","id":5,"result":{"tools":[{"name":"secret"},{"name":"echo"}]}}]"#;
        let ids = [json!(5)];
        let got = inspect(text, &rule(&ids, false));
        assert_eq!(got.messages.len(), 4);
        assert_eq!(got.messages[0].error_code, Some(-32001));
        assert!(got.messages[0].is_error);
        assert_eq!(got.messages[1].kind, Kind::Request);
        assert_eq!(got.messages[2].cancels, Some(json!(4)));
        let out: Value = serde_json::from_slice(got.rewritten.as_ref().unwrap()).unwrap();
        assert_eq!(out[3]["result"]["tools"], json!([{"name":"echo"}]));
        assert_eq!(out[0]["error"]["code"], -32001);
    }
}
