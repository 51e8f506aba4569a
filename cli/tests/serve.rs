//! `recontrol serve` driven by the official `openai` Python client
//! (`tests/serve/check_server.py`): greedy and seeded chat and text completions equal
//! `recontrol generate` on the same prompts, with and without control (two value heads); streamed
//! text equals non-streamed text; 32 concurrent mixed requests each equal their sequential
//! result; n choices, the control trace and stop sequences; hostile inputs get their statuses and
//! the server keeps answering; disconnected clients free their rows; SIGTERM lets an in-flight
//! stream finish and the server exits 0.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use recontrol_tests::cli::{self, arg as s, stderr};
use recontrol_tests::{copy_dir, lm_fixture, lm_prompts, repo_root, value_dir};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_recontrol");
const MAX_TOKENS: usize = 12;

/// ChatML, as SmolLM2 and Qwen have it.
const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// `recontrol generate`'s responses for `prompts` with `flags`.
fn generate(model: &Path, prompts: &Path, out: &Path, flags: &[&str]) -> Vec<String> {
    let max = MAX_TOKENS.to_string();
    let mut args = vec![
        "generate",
        "--model",
        s(model),
        "--prompts",
        s(prompts),
        "--max-new-tokens",
        &max,
        "--out",
        s(out),
        "--grad-backend",
        "torch",
    ];
    args.extend_from_slice(flags);
    let run = cli::run(BIN, &args);
    assert!(run.status.success(), "generate {flags:?}: {}", stderr(&run));
    std::fs::read_to_string(out)
        .expect("generations")
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("json");
            v["response"].as_str().expect("response").to_owned()
        })
        .collect()
}

#[test]
fn the_openai_client_gets_generate_outputs_batched_streamed_and_steered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("tiny");
    copy_dir(&lm_fixture("llama-mha"), &model).expect("copy fixture");
    std::fs::write(model.join("chat_template.jinja"), CHAT_TEMPLATE).expect("template");
    let identity = recontrol_lm::model_identity(&model).expect("identity");
    let a = value_dir(&dir.path().join("value-a"), 64, &identity, 1);
    let b = value_dir(&dir.path().join("value-b"), 64, &identity, 2);
    let prompts: Vec<String> = lm_prompts().into_iter().take(3).collect();
    let prompts_file = dir.path().join("prompts.jsonl");
    let lines: Vec<String> = prompts
        .iter()
        .map(|p| json!({ "prompt": p }).to_string())
        .collect();
    std::fs::write(&prompts_file, lines.join("\n")).expect("prompts");

    let (a_s, b_s) = (s(&a).to_owned(), s(&b).to_owned());
    let control_a = ["--value", &a_s, "--alpha", "0.5", "--steps", "3"];
    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        (
            "chat-plain",
            json!({"endpoint": "chat", "temperature": 0}),
            vec!["--chat"],
        ),
        (
            "chat-control-a",
            json!({"endpoint": "chat", "temperature": 0,
                   "control": {"value": "a", "alpha": 0.5, "steps": 3}}),
            [&["--chat"][..], &control_a].concat(),
        ),
        (
            "completion-plain",
            json!({"endpoint": "completions", "temperature": 0}),
            vec![],
        ),
        (
            "completion-control-b",
            json!({"endpoint": "completions", "temperature": 0,
                   "control": {"value": "b", "alpha": 1.0, "steps": 5, "max_edit_norm": 2.0}}),
            vec![
                "--value",
                &b_s,
                "--alpha",
                "1.0",
                "--steps",
                "5",
                "--max-edit-norm",
                "2.0",
            ],
        ),
        (
            "completion-sampled",
            json!({"endpoint": "completions", "temperature": 0.8, "top_p": 0.9, "seed": 7,
                   "as_list": true}),
            vec!["--temperature", "0.8", "--top-p", "0.9", "--seed", "7"],
        ),
        (
            "chat-sampled-control-a",
            json!({"endpoint": "chat", "temperature": 0.7, "seed": 11,
                   "control": {"value": "a", "alpha": 0.5, "steps": 3}}),
            [
                &["--chat", "--temperature", "0.7", "--seed", "11"][..],
                &control_a,
            ]
            .concat(),
        ),
    ];
    let mut spec_cases = Vec::new();
    for (name, mut case, flags) in cases {
        let out = dir.path().join(format!("{name}.jsonl"));
        let mut expected = generate(&model, &prompts_file, &out, &flags);
        // A single sampled chat request draws from stream 0: generate's first prompt.
        if name == "chat-sampled-control-a" {
            expected.truncate(1);
        }
        case["name"] = json!(name);
        case["expected"] = json!(expected);
        spec_cases.push(case);
    }
    let spec = json!({
        "model": "tiny",
        "max_tokens": MAX_TOKENS,
        "prompts": prompts,
        "cases": spec_cases,
        "heads": ["a", "b"],
        "max_queue": 40,
        "max_body_bytes": 4096,
        "max_positions": 256,
        // Gradient steps that make a token slow enough to disconnect or stop mid-request.
        "slow_steps": 1000,
    });
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).expect("spec");

    let (a_spec, b_spec) = (format!("a={a_s}"), format!("b={b_s}"));
    let mut server = Command::new(BIN)
        .args([
            "serve",
            "--model",
            s(&model),
            "--value",
            &a_spec,
            "--value",
            &b_spec,
            "--grad-backend",
            "torch",
            "--port",
            "0",
            "--api-key",
            "sk-test",
            "--served-model-name",
            "tiny",
            "--max-queue",
            "40",
            "--max-body-bytes",
            "4096",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start recontrol serve");
    let (tx, rx) = mpsc::channel();
    let lines = BufReader::new(server.stderr.take().expect("stderr"));
    std::thread::spawn(move || {
        for line in lines.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    let address = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the server did not start: {log:?}"));
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().expect("address").to_owned();
        }
        log.push(line);
    };
    let check = Command::new(repo_root().join(".venv/bin/python"))
        .arg(repo_root().join("tests/serve/check_server.py"))
        .args(["--base-url", &address, "--api-key", "sk-test", "--spec"])
        .arg(&spec_path)
        .args(["--pid", &server.id().to_string()])
        .output()
        .expect("run check_server.py");
    let report = String::from_utf8_lossy(&check.stderr);
    eprintln!("{report}");
    if !check.status.success() {
        let _ = server.kill();
        let server_log: Vec<String> = rx.try_iter().collect();
        panic!(
            "check_server.py failed:\n{report}\nserver:\n{}",
            server_log.join("\n")
        );
    }
    // The script sent SIGTERM: the server finishes and exits 0.
    let start = Instant::now();
    let status = loop {
        if let Some(status) = server.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > Duration::from_secs(40) {
            let _ = server.kill();
            panic!("the server did not exit within 40 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the server exited with {status}");
    let tail: Vec<String> = rx.try_iter().collect();
    assert!(
        tail.iter().any(|l| l.contains("stopped")),
        "no stop line in {tail:?}"
    );
}

#[test]
fn bad_serve_flags_fail_before_binding_with_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = lm_fixture("llama-mha");
    let run_with = |flags: &[String]| {
        let mut args = vec!["serve".to_owned(), "--model".into(), s(&model).to_owned()];
        args.extend_from_slice(flags);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli::run(BIN, &args)
    };
    // Refused by the parser (clap's message, then its usage hint).
    for (flags, needle) in [
        (vec!["--value", "novalue"], "NAME=ARTIFACT"),
        (vec!["--max-batch", "0"], "--max-batch"),
        (vec!["--shutdown-timeout", "-1"], "--shutdown-timeout"),
        (vec!["--port", "99999"], "--port"),
    ] {
        let flags: Vec<String> = flags.into_iter().map(str::to_owned).collect();
        let run = run_with(&flags);
        let err = stderr(&run);
        assert!(
            !run.status.success() && !err.contains("panicked"),
            "{flags:?}: {err}"
        );
        let first = err.lines().find(|l| l.starts_with("error:")).unwrap_or("");
        assert!(first.contains(needle), "{flags:?}: {err}");
    }
    // Refused when loading or binding, before serving anything.
    let missing = format!("a={}", dir.path().join("missing").display());
    for (flags, needle) in [
        (vec!["--value".to_owned(), missing], "--value a="),
        (
            vec!["--host".to_owned(), "no such host".to_owned()],
            "cannot listen",
        ),
    ] {
        cli::assert_fails_with(&run_with(&flags), needle);
    }
    let run = cli::run(BIN, &["serve", "--model", s(&dir.path().join("nope"))]);
    cli::assert_fails_with(&run, "nope");
}

/// SIGTERM with a request that outlives `--shutdown-timeout`: the request is cancelled (its
/// stream ends with an OpenAI error, not `[DONE]`) and the server still exits 0, promptly.
#[test]
fn shutdown_cancels_what_outlives_the_timeout() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let model = lm_fixture("llama-mha");
    let identity = recontrol_lm::model_identity(&model).expect("identity");
    let value = value_dir(&dir.path().join("value"), 64, &identity, 1);
    let spec = format!("a={}", s(&value));
    let mut server = Command::new(BIN)
        .args(["serve", "--model", s(&model), "--value", &spec])
        .args([
            "--grad-backend",
            "torch",
            "--port",
            "0",
            "--shutdown-timeout",
            "0.5",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start recontrol serve");
    let mut lines = BufReader::new(server.stderr.take().expect("stderr")).lines();
    let address = loop {
        let line = lines.next().expect("a line").expect("utf-8");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().expect("address").to_owned();
        }
    };
    // Slow on purpose: 1000 gradient steps per token, 200 tokens.
    let body = json!({"model": "llama-mha", "prompt": "hi", "max_tokens": 200, "temperature": 0,
        "stream": true, "control": {"value": "a", "alpha": 0.01, "steps": 1000}})
    .to_string();
    let mut stream = std::net::TcpStream::connect(&address).expect("connect");
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("\"text\"") {
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "the stream closed before its first chunk");
        received.extend_from_slice(&buf[..n]);
    }
    let signalled = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.contains("shutting down") && !text.contains("[DONE]"),
        "the cut-off stream: {text}"
    );
    let status = loop {
        if let Some(status) = server.try_wait().expect("wait") {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(20),
            "the server did not exit within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "shutdown took {:?} with a 0.5 s timeout",
        signalled.elapsed()
    );
}
