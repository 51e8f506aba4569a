//! Every supported ggml type dequantizes bit for bit as gguf-py's `gguf.quants.dequantize`.

mod common;

use common::{first_bit_difference, fixtures, read_safetensors};
use recontrol_gguf::{GgmlType, GgufFile};

const TYPES: [&str; 11] = [
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
];

#[test]
fn every_type_matches_gguf_py_bit_for_bit() -> recontrol_gguf::Result<()> {
    let dir = fixtures().join("quants");
    for ty in TYPES {
        let file = GgufFile::open(&dir.join(format!("{ty}.gguf")))?;
        let reference = read_safetensors(&dir.join(format!("{ty}.safetensors")));
        assert_eq!(file.tensors().len(), reference.len(), "{ty}");
        for info in file.tensors() {
            assert_eq!(info.ggml_type.to_string(), ty);
            let want = &reference[&info.name];
            let shape: Vec<usize> = info.shape().iter().map(|&d| d as usize).collect();
            assert_eq!(shape, want.shape, "{ty} {}", info.name);
            let got = file.dequantize(info)?;
            assert_eq!(got.len(), want.values.len(), "{ty} {}", info.name);
            if let Some((i, g, w)) = first_bit_difference(&got, &want.values) {
                panic!(
                    "{ty} {}: element {i} is {g:e}, gguf-py gives {w:e}",
                    info.name
                );
            }
        }
    }
    Ok(())
}

#[test]
fn the_alignment_is_read_from_the_metadata() -> recontrol_gguf::Result<()> {
    let dir = fixtures().join("quants");
    let file = GgufFile::open(&dir.join("Q8_0.gguf"))?;
    assert_eq!(file.alignment(), 64);
    assert_eq!(file.data_start() % 64, 0);
    assert!(file.tensors().iter().all(|t| t.start % 64 == 0));
    assert_eq!(GgufFile::open(&dir.join("F32.gguf"))?.alignment(), 32);
    Ok(())
}

#[test]
fn an_unsupported_type_is_named_with_its_tensor() -> recontrol_gguf::Result<()> {
    let file = GgufFile::open(&fixtures().join("bad/unsupported-type.gguf"))?;
    let info = &file.tensors()[0];
    assert_eq!(info.ggml_type, GgmlType::Q2_K);
    let err = file.dequantize(info).expect_err("Q2_K");
    assert_eq!(
        err.to_string(),
        "tensor w: Q2_K cannot be dequantized (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)"
    );
    Ok(())
}
