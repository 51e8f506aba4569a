//! Training checkpoints: the optimizer's parameters and moments (and any extra named tensors)
//! as float32 safetensors, with the JSON training state in the file's metadata, written under a
//! temporary name and renamed when complete. Pretraining, reward and value training share it.

use std::collections::HashMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::optim::AdamW;
use crate::{Error, Result};

/// Named tensors, as a checkpoint holds them.
pub type Tensors = HashMap<String, Tensor>;

/// Saves `state`, the optimizer's parameters and moments, and `extra` tensors to `path`.
pub fn save<S: Serialize + ?Sized>(
    path: &Path,
    state: &S,
    opt: &AdamW,
    extra: &[(String, Tensor)],
) -> Result<()> {
    let json = serde_json::to_string(state).map_err(|e| Error::Malformed {
        path: path.to_owned(),
        message: format!("cannot write the training state: {e}"),
    })?;
    let mut tensors: Vec<(String, Tensor)> = opt
        .params()
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    tensors.extend(opt.state());
    tensors.extend(extra.iter().map(|(n, t)| (n.clone(), t.shallow_clone())));
    write_safetensors(
        path,
        &tensors,
        Some(HashMap::from([("state".to_owned(), json)])),
    )
}

/// The state and tensors saved by [`save`] (tensors on the CPU).
pub fn load<S: DeserializeOwned>(path: &Path) -> Result<(S, Tensors)> {
    let bad = |message: String| Error::Malformed {
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let state_json = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("state"))
        .ok_or_else(|| bad("no training state in the metadata".into()))?;
    let state: S = serde_json::from_str(state_json).map_err(|e| bad(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!("tensor {name:?} is not f32")));
        }
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        tensors.insert(
            name,
            Tensor::f_from_data_size(view.data(), &shape, Kind::Float)?,
        );
    }
    Ok((state, tensors))
}

/// A tensor as a shape and little-endian f32 bytes.
fn to_f32_bytes(t: &Tensor) -> Result<(Vec<usize>, Vec<u8>)> {
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let values = Vec::<f32>::try_from(
        t.f_detach()?
            .f_to_kind(Kind::Float)?
            .f_to_device(Device::Cpu)?
            .f_contiguous()?
            .f_flatten(0, -1)?,
    )?;
    Ok((shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()))
}

/// Writes named tensors as an f32 safetensors file with `metadata`, atomically: safetensors
/// (0.8) writes a temporary file in the same folder and renames it into place, so `path` never
/// holds a partial file and a failed write leaves nothing behind.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let data = tensors
        .iter()
        .map(|(n, t)| to_f32_bytes(t).map(|(s, b)| (n.clone(), s, b)))
        .collect::<Result<Vec<_>>>()?;
    let write_error = |e: safetensors::SafeTensorError| Error::Write {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let views = data
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(write_error)
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, metadata, path).map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamWConfig;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct State {
        step: usize,
        note: String,
    }

    /// Parameters, moments, extras and the JSON state come back exactly; the file is all
    /// that is written.
    #[test]
    fn a_checkpoint_round_trips() -> Result<()> {
        let p = Tensor::from_slice(&[1.0f32, -2.0, 3.0, -4.0])
            .reshape([2, 2])
            .set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![("w".into(), p.shallow_clone())],
            AdamWConfig::default(),
        )?;
        (&p * &p).sum(Kind::Float).backward();
        opt.step(0.1)?;
        let extra = vec![("best.w".to_owned(), Tensor::from_slice(&[7.0f32, 8.0]))];
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ckpt.safetensors");
        let state = State {
            step: 1,
            note: "x".into(),
        };
        save(&path, &state, &opt, &extra)?;
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["ckpt.safetensors"]);

        let (back, tensors): (State, _) = load(&path)?;
        assert_eq!(back, state);
        let mut keys: Vec<&str> = tensors.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["adamw.m.w", "adamw.v.w", "best.w", "w"]);
        assert!(tensors["w"].equal(&p.detach()));
        assert!(tensors["best.w"].equal(&extra[0].1));

        // A fresh optimizer restored from the file takes the same next step.
        let q = tensors["w"].detach_copy().set_requires_grad(true);
        let mut restored = AdamW::new(
            vec![("w".into(), q.shallow_clone())],
            AdamWConfig::default(),
        )?;
        restored.load_state(&tensors, opt.steps())?;
        for (param, o) in [(&p, &mut opt), (&q, &mut restored)] {
            o.zero_grad();
            (param * param).sum(Kind::Float).backward();
            o.step(0.1)?;
        }
        assert!(p.detach().equal(&q.detach()));
        Ok(())
    }

    #[test]
    fn a_file_without_training_state_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("plain.safetensors");
        write_safetensors(&path, &[("w".into(), Tensor::from_slice(&[1.0f32]))], None)
            .expect("write");
        let err = load::<State>(&path).expect_err("no state").to_string();
        assert!(
            err.contains("plain.safetensors: no training state in the metadata"),
            "{err}"
        );
    }
}
