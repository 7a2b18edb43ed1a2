//! A small HTTP server on loopback that answers the Hub API calls `publish` makes (create repo,
//! branch, preupload, commit) the way the Hub does, and records every request. It serves a
//! bounded number of requests and stops by itself.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Path with the query string.
    pub target: String,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

pub struct HubServer {
    pub url: String,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
}

impl HubServer {
    /// Starts the server on 127.0.0.1 with a free port.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(32).flatten() {
                let seen = seen.clone();
                std::thread::spawn(move || serve(stream, &seen));
            }
        });
        Self { url, requests }
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

/// Answers requests on one connection (keep-alive) until it closes; at most 64 requests.
fn serve(stream: TcpStream, seen: &Mutex<Vec<Recorded>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for _ in 0..64 {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let (mut length, mut authorization) = (0usize, None);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                match k.trim().to_lowercase().as_str() {
                    "content-length" => length = v.trim().parse().unwrap_or(0),
                    "authorization" => authorization = Some(v.trim().to_string()),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let path = target.split('?').next().unwrap_or("").to_string();
        let (status, reply) = respond(&method, &target, &body, authorization.as_deref());
        let target = target.clone();
        seen.lock().unwrap().push(Recorded {
            method,
            path,
            target,
            authorization,
            body,
        });
        let text = reply.to_string();
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            text.len()
        );
        if writer
            .write_all(head.as_bytes())
            .and_then(|_| writer.write_all(text.as_bytes()))
            .is_err()
        {
            return;
        }
    }
}

/// The Hub's answers for the calls used. Creating a repo named `echo-auth` fails with an error
/// that repeats the request's Authorization header (as a careless proxy might).
fn respond(
    method: &str,
    target: &str,
    body: &[u8],
    authorization: Option<&str>,
) -> (&'static str, serde_json::Value) {
    let path = target.split('?').next().unwrap_or("");
    if body.windows(9).any(|w| w == b"echo-auth") {
        let echoed = format!("invalid credentials: {}", authorization.unwrap_or(""));
        return ("401 Unauthorized", serde_json::json!({ "error": echoed }));
    }
    match (method, path) {
        ("POST", "/api/repos/create") => {
            let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let id = format!(
                "{}/{}",
                req["organization"].as_str().unwrap_or(""),
                req["name"].as_str().unwrap_or("")
            );
            (
                "200 OK",
                serde_json::json!({"url": format!("https://huggingface.co/{id}")}),
            )
        }
        ("POST", p) if p.contains("/branch/") => ("200 OK", serde_json::json!({})),
        ("POST", p) if p.contains("/preupload/") => {
            let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let files: Vec<serde_json::Value> = req["files"]
                .as_array()
                .map(|a| a.iter().map(|f| serde_json::json!({"path": f["path"], "uploadMode": "regular", "shouldIgnore": false})).collect())
                .unwrap_or_default();
            ("200 OK", serde_json::json!({"files": files}))
        }
        ("POST", p) if p.contains("/commit/") => {
            let pr = target.contains("create_pr=1");
            (
                "200 OK",
                serde_json::json!({
                    "commitUrl": "https://huggingface.co/acme/adapter/commit/0123456789abcdef0123456789abcdef01234567",
                    "commitOid": "0123456789abcdef0123456789abcdef01234567",
                    "pullRequestUrl": if pr { serde_json::json!("https://huggingface.co/acme/adapter/discussions/1") } else { serde_json::Value::Null },
                }),
            )
        }
        _ => (
            "404 Not Found",
            serde_json::json!({"error": format!("no route for {method} {path}")}),
        ),
    }
}
