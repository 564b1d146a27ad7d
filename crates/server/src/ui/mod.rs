//! The operator dashboard at `/ui`: a static page and script embedded in the binary (works
//! offline, no CDN), which signs in with an API key and polls the JSON routes the SDKs use
//! (`/sandboxes`, `/sandboxes/{id}/metrics`, `/audit`, `/snapshots`, `/tiers`, envd's
//! `ListDir`), plus [`overview`] for what only the server knows (image templates, pools).
//!
//! Everything a sandbox influences (metadata, command lines, file names, output) reaches the
//! page only through `textContent` and attributes, never as markup, and the Content-Security-
//! Policy allows no inline script or style: a payload that slipped through would still not run.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::api::App;

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const ICON: &str = include_str!("assets/icon.svg");

/// Same-origin everything, no inline code, no framing, no plugins.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// The `/ui` routes.
pub fn routes(app: App) -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/ui/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/ui/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
        .route("/ui/icon.svg", get(|| async { asset("image/svg+xml", ICON) }))
        .route("/ui/api/overview", get(overview))
        .with_state(app)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Assets change with the binary: always revalidated, never stale after an upgrade.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// `GET /ui/api/overview`: templates (built-in and image templates, which every key may use)
/// and warm pools (template → sandboxes waiting). Needs an API key like everything else.
async fn overview(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Err(e) = crate::api::caller(&app, &headers).await {
        return e.into_response();
    }
    let data_dir = app.manager.config().data_dir.clone();
    let images = tokio::task::spawn_blocking(move || {
        ringfence_image::store::Store::open(&data_dir).and_then(|s| s.list())
    })
    .await;
    let images: Vec<Value> = match images {
        Ok(Ok(list)) => list
            .iter()
            .map(|r| {
                json!({"name": r.name, "source": r.source, "size": r.size,
                       "imported_unix": r.imported_unix, "layers": r.layers.len()})
            })
            .collect(),
        // No image store yet (or unreadable): no image templates to show; the page says so.
        _ => Vec::new(),
    };
    let pools = app.manager.pool_sizes();
    (
        StatusCode::OK,
        axum::Json(json!({
            "builtin": ringfence_image::store::RESERVED.iter().filter(|t| **t != "host").collect::<Vec<_>>(),
            "images": images,
            "pools": pools,
        })),
    )
        .into_response()
}
