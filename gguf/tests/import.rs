//! Imports of the tiny GGUF fixtures match what transformers' own GGUF loader makes of them
//! (weights bit for bit in f32, the config), and bad files leave nothing behind.

mod common;

use std::path::{Path, PathBuf};

use common::{first_bit_difference, fixtures, read_safetensors};
use recontrol_gguf::{import_gguf, Architecture, Error, GgufFile, ImportOptions, OutDtype};
use serde_json::Value;

const MODELS: [&str; 4] = ["llama-gqa", "mistral", "qwen2", "llama-spm"];

/// Weights and configs only: tokenizer.json is the tokenizer module's, tested with it.
fn options(dtype: OutDtype) -> ImportOptions {
    ImportOptions {
        dtype,
        tokenizer: None,
    }
}

fn model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn f32_weights_equal_transformers_bit_for_bit() -> recontrol_gguf::Result<()> {
    for name in MODELS {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = tmp.path().join(name);
        let summary = import_gguf(
            &model(name).join("model.gguf"),
            &out,
            &options(OutDtype::F32),
        )?;
        let got = read_safetensors(&out.join("model.safetensors"));
        let want = read_safetensors(&model(name).join("reference/model.safetensors"));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{name}: weight names"
        );
        for (key, w) in &want {
            let g = &got[key];
            assert_eq!(g.shape, w.shape, "{name} {key}");
            if let Some((i, gv, wv)) = first_bit_difference(&g.values, &w.values) {
                panic!("{name} {key}: element {i} is {gv:e}, transformers has {wv:e}");
            }
        }
        assert_eq!(summary.tensors, want.len());
        let parameters: usize = want.values().map(|t| t.values.len()).sum();
        assert_eq!(summary.parameters, parameters as u64);
        assert_eq!(
            entries(&out),
            [
                "config.json",
                "generation_config.json",
                "gguf_import.json",
                "model.safetensors",
                "tokenizer_config.json"
            ]
        );
        assert_eq!(
            entries(tmp.path()),
            [name],
            "{name}: nothing else beside the output"
        );
    }
    Ok(())
}

#[test]
fn configs_match_transformers() -> recontrol_gguf::Result<()> {
    for name in MODELS {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = tmp.path().join(name);
        let summary = import_gguf(
            &model(name).join("model.gguf"),
            &out,
            &options(OutDtype::F32),
        )?;
        let got = read_json(&out.join("config.json"));
        let want = read_json(&model(name).join("reference/config.json"));
        for key in [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "hidden_act",
            "max_position_embeddings",
            "rms_norm_eps",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
            "dtype",
        ] {
            assert_eq!(got[key], want[key], "{name}: {key}");
        }
        for key in [
            "head_dim",
            "attention_bias",
            "unk_token_id",
            "use_sliding_window",
        ] {
            // MistralConfig has no attention_bias (the reference is a llama twin).
            if want.get(key).is_some() && !(name == "mistral" && key == "attention_bias") {
                assert_eq!(got[key], want[key], "{name}: {key}");
            }
        }
        // transformers writes a missing pad id as null; we leave it out.
        assert_eq!(
            got.get("pad_token_id").unwrap_or(&Value::Null),
            &want["pad_token_id"],
            "{name}: pad_token_id"
        );
        assert_eq!(
            got["rope_theta"], want["rope_parameters"]["rope_theta"],
            "{name}"
        );
        // The mistral fixture's reference is its llama-named twin (transformers cannot load a
        // GGUF named "mistral"), so only the model type differs.
        let model_type = if name == "mistral" {
            "mistral"
        } else {
            want["model_type"].as_str().expect("model_type")
        };
        assert_eq!(got["model_type"], model_type, "{name}");
        let arch = match name {
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            _ => Architecture::Llama,
        };
        assert_eq!(summary.architecture, arch);
        assert_eq!(got["architectures"][0], arch.hf_class());
        let generation = read_json(&out.join("generation_config.json"));
        assert_eq!(generation["eos_token_id"], want["eos_token_id"], "{name}");
        assert_eq!(generation["bos_token_id"], want["bos_token_id"], "{name}");
    }
    Ok(())
}

#[test]
fn tokenizer_configs_match_transformers() -> recontrol_gguf::Result<()> {
    // add_bos_token: unset in llama-gqa (a gpt2 vocabulary: false), true in mistral, false in
    // qwen2, unset in llama-spm (a SentencePiece vocabulary: true).
    for (name, add_bos) in [
        ("llama-gqa", false),
        ("mistral", true),
        ("qwen2", false),
        ("llama-spm", true),
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = tmp.path().join(name);
        import_gguf(
            &model(name).join("model.gguf"),
            &out,
            &options(OutDtype::F32),
        )?;
        let got = read_json(&out.join("tokenizer_config.json"));
        let reference = model(name).join("reference/tokenizer");
        let want = read_json(&reference.join("tokenizer_config.json"));
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            let got = got.get(key).unwrap_or(&Value::Null);
            assert_eq!(got, &want[key], "{name}: {key}");
        }
        let template = std::fs::read_to_string(reference.join("chat_template.jinja"))
            .expect("chat_template.jinja");
        assert_eq!(got["chat_template"], template.as_str(), "{name}");
        assert_eq!(got["add_bos_token"], add_bos, "{name}");
        assert_eq!(got["add_eos_token"], false, "{name}");
    }
    Ok(())
}

#[test]
fn half_outputs_are_the_f32_weights_rounded() -> recontrol_gguf::Result<()> {
    let want = read_safetensors(&model("llama-gqa").join("reference/model.safetensors"));
    for (dtype, round) in [
        (
            OutDtype::BF16,
            (|v| half::bf16::from_f32(v).to_f32()) as fn(f32) -> f32,
        ),
        (OutDtype::F16, |v| half::f16::from_f32(v).to_f32()),
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = tmp.path().join("m");
        import_gguf(
            &model("llama-gqa").join("model.gguf"),
            &out,
            &options(dtype),
        )?;
        let got = read_safetensors(&out.join("model.safetensors"));
        for (key, w) in &want {
            let rounded: Vec<f32> = w.values.iter().map(|&v| round(v)).collect();
            assert_eq!(
                first_bit_difference(&got[key].values, &rounded),
                None,
                "{dtype:?} {key}"
            );
        }
        let config = read_json(&out.join("config.json"));
        assert_eq!(config["dtype"], dtype.torch_name());
    }
    Ok(())
}

/// Imports a bad file: the one-line error, and nothing left where the output would go.
fn refused(file: &Path) -> String {
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = import_gguf(file, &tmp.path().join("out"), &options(OutDtype::F32))
        .expect_err("a bad file");
    let message = err.to_string();
    assert!(!message.contains('\n'), "{message}");
    assert!(
        entries(tmp.path()).is_empty(),
        "{}: left {:?}",
        file.display(),
        entries(tmp.path())
    );
    message
}

#[test]
fn bad_files_get_one_error_and_leave_nothing() {
    let bad = fixtures().join("bad");
    let path = |name: &str| bad.join(name);
    let starts = |name: &str, want: &str| {
        let message = refused(&path(name));
        let prefix = format!("{}: {want}", path(name).display());
        assert!(message.starts_with(&prefix), "{name}: {message}");
    };
    starts(
        "truncated.gguf",
        "metadata tokenizer.ggml.tokens: 512 array elements starting at byte 643 cannot fit in the 1357 bytes left",
    );
    starts("truncated-data.gguf", "tensor output_norm.weight: bytes ");
    starts(
        "offset-past-end.gguf",
        "tensor w: bytes 1099511627904..1099511627936 lie past the end of the file (160 bytes)",
    );
    starts(
        "tensor-count.gguf",
        "4611686018427387904 tensor infos starting at byte 69 cannot fit in the 27 bytes left",
    );
    starts(
        "huge-dims.gguf",
        "tensor w: dimensions [4294967296, 4294967296, 4294967296] are too large",
    );
    starts("unknown-type.gguf", "tensor w: unknown ggml type id 99");
    assert_eq!(
        refused(&path("bert.gguf")),
        "architecture bert is not supported (supported: llama, mistral (written as llama), qwen2)"
    );
    assert_eq!(
        refused(&path("missing-tensor.gguf")),
        "tensor blk.1.ffn_down.weight: missing; llama with this config needs it"
    );
    assert_eq!(
        refused(&path("wrong-shape.gguf")),
        "tensor blk.0.attn_k.weight: HF shape [64, 64] does not match the config's [32, 64]"
    );
}

#[test]
fn an_existing_output_is_kept_and_an_empty_one_replaced() -> recontrol_gguf::Result<()> {
    let src = model("qwen2").join("model.gguf");
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    std::fs::write(out.join("keep"), b"mine").expect("write");
    let err = import_gguf(&src, &out, &options(OutDtype::F32)).expect_err("occupied");
    assert!(matches!(err, Error::Output(_)), "{err}");
    assert!(err
        .to_string()
        .ends_with("out: exists; remove it or choose another name"));
    assert_eq!(entries(&out), ["keep"]);
    std::fs::remove_file(out.join("keep")).expect("rm");
    import_gguf(&src, &out, &options(OutDtype::F32))?;
    assert!(out.join("model.safetensors").is_file());
    assert_eq!(entries(tmp.path()), ["out"]);
    Ok(())
}

fn write_empty_tokenizer(_: &GgufFile, path: &Path) -> recontrol_gguf::Result<()> {
    std::fs::write(path, b"{}").map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}

fn fail_tokenizer(_: &GgufFile, _: &Path) -> recontrol_gguf::Result<()> {
    Err(Error::Unsupported {
        what: "this vocabulary".to_owned(),
    })
}

#[test]
fn the_tokenizer_step_writes_into_the_output_or_stops_it() -> recontrol_gguf::Result<()> {
    let src = model("llama-spm").join("model.gguf");
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let with = |tokenizer| ImportOptions {
        dtype: OutDtype::F32,
        tokenizer: Some(tokenizer),
    };
    let err = import_gguf(&src, &out, &with(fail_tokenizer)).expect_err("tokenizer fails");
    assert_eq!(err.to_string(), "this vocabulary is not supported yet");
    assert!(entries(tmp.path()).is_empty());
    let summary = import_gguf(&src, &out, &with(write_empty_tokenizer))?;
    assert!(summary.tokenizer_json);
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).expect("read"),
        b"{}"
    );
    Ok(())
}

#[test]
fn corrupted_headers_never_panic_or_leave_a_half_written_output() {
    let good = std::fs::read(model("llama-gqa").join("model.gguf")).expect("read");
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("corrupt.gguf");
    let out = tmp.path().join("out");
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let header_len = 16 * 1024; // the metadata and tensor infos lie in the first 16 KiB
    for _ in 0..300 {
        let mut bytes = good.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % header_len) as usize;
            bytes[at] = next() as u8;
        }
        std::fs::write(&src, &bytes).expect("write");
        match import_gguf(&src, &out, &options(OutDtype::F32)) {
            Ok(_) => std::fs::remove_dir_all(&out).expect("rm"),
            Err(e) => assert!(!e.to_string().contains('\n'), "{e}"),
        }
        assert_eq!(entries(tmp.path()), ["corrupt.gguf"]);
    }
}
