//! The JSON-RPC layer on its own (no server: the router behind the tools is empty, and every
//! case here is decided before a tool would reach it).

use serde_json::{Value, json};

use super::tools::Ctx;

fn ctx() -> Ctx {
    Ctx { api: axum::Router::new(), key: "k".into() }
}

async fn ask(msg: Value) -> Option<Value> {
    super::one(&ctx(), msg).await
}

#[tokio::test]
async fn initialize_agrees_on_a_version_both_speak() {
    let r = ask(json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                       "params": {"protocolVersion": "2025-03-26"}}))
    .await
    .unwrap();
    assert_eq!(r["id"], 1);
    assert_eq!(r["result"]["protocolVersion"], "2025-03-26");
    assert_eq!(r["result"]["serverInfo"]["name"], "ringfence");
    assert!(r["result"]["capabilities"]["tools"].is_object());
    // One we do not know: our newest, for the client to accept or refuse.
    let r = ask(json!({"jsonrpc": "2.0", "id": "x", "method": "initialize",
                       "params": {"protocolVersion": "1999-01-01"}}))
    .await
    .unwrap();
    assert_eq!(r["result"]["protocolVersion"], super::PROTOCOL_VERSIONS[0]);
}

#[tokio::test]
async fn notifications_and_responses_get_no_answer() {
    assert!(ask(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await.is_none());
    assert!(ask(json!({"jsonrpc": "2.0", "id": 3, "result": {}})).await.is_none());
}

#[tokio::test]
async fn malformed_messages_and_unknown_methods_are_errors() {
    let r = ask(json!([1, 2])).await.unwrap();
    assert_eq!(r["error"]["code"], super::INVALID_REQUEST);
    let r = ask(json!({"jsonrpc": "2.0", "id": 1, "method": 7})).await.unwrap();
    assert_eq!(r["error"]["code"], super::INVALID_REQUEST);
    let r = ask(json!({"jsonrpc": "2.0", "id": 1, "method": "resources/list"})).await.unwrap();
    assert_eq!(r["error"]["code"], super::METHOD_NOT_FOUND);
    assert!(r["error"]["message"].as_str().unwrap().contains("resources/list"));
}

#[tokio::test]
async fn tools_are_listed_with_schemas() {
    let r = ask(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})).await.unwrap();
    let tools = r["result"]["tools"].as_array().unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    for want in [
        "create_sandbox",
        "list_sandboxes",
        "kill_sandbox",
        "run_command",
        "run_code",
        "read_file",
        "write_file",
        "list_files",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(tools.iter().all(|t| t["inputSchema"]["type"] == "object"));
}

async fn call(name: &str, args: Value) -> Value {
    ask(json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
               "params": {"name": name, "arguments": args}}))
    .await
    .unwrap()
}

#[tokio::test]
async fn bad_arguments_are_tool_errors_naming_the_problem() {
    for (name, args, want) in [
        ("run_command", json!({"sandbox_id": "a"}), "missing required argument \"command\""),
        ("run_command", json!({"sandbox_id": "a", "command": 5}), "\"command\" must be string"),
        (
            "run_command",
            json!({"sandbox_id": "a", "command": "x", "timeout": "1"}),
            "\"timeout\" must be number",
        ),
        ("create_sandbox", json!({"timeout": 1.5}), "\"timeout\" must be a whole number"),
        ("create_sandbox", json!({"allow_out": [1]}), "must be an array of strings"),
        ("create_sandbox", json!({"metadata": {"a": 1}}), "must be an object of string values"),
        ("list_files", json!({"sandbox_id": "a", "path": "/", "depth": 3}), "unknown argument"),
        ("kill_sandbox", json!({"sandbox_id": "../metrics?x"}), "is not a sandbox id"),
        ("read_file", json!({"sandbox_id": "", "path": "/"}), "is not a sandbox id"),
    ] {
        let r = call(name, args.clone()).await;
        assert_eq!(r["result"]["isError"], true, "{name} {args}: {r}");
        let text = r["result"]["content"][0]["text"].as_str().unwrap();
        assert!(text.contains(want), "{name} {args}: {text}");
    }
}

#[tokio::test]
async fn unknown_tools_and_non_object_arguments_are_protocol_errors() {
    let r = call("rm_rf", json!({})).await;
    assert_eq!(r["error"]["code"], super::INVALID_PARAMS);
    assert!(r["error"]["message"].as_str().unwrap().contains("rm_rf"));
    let r = call("list_sandboxes", json!([1])).await;
    assert_eq!(r["error"]["code"], super::INVALID_PARAMS);
}
