//! Training checkpoints: the optimizer's parameters and moments (and any extra named tensors)
//! as float32 safetensors, with the JSON training state in the file's metadata, written under a
//! temporary name and renamed when complete. Pretraining, reward and value training share it.

use std::collections::HashMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::optim::AdamW;
use crate::pretrain::write_safetensors;

/// Saves `state`, the optimizer's parameters and moments, and `extra` tensors to `path`.
pub fn save<S: Serialize>(
    path: &Path,
    state: &S,
    opt: &AdamW,
    extra: &[(String, Tensor)],
) -> Result<()> {
    let json = serde_json::to_string(state).map_err(|e| Error::Checkpoint(e.to_string()))?;
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

/// The state and tensors saved by [`save`].
pub fn load<S: DeserializeOwned>(path: &Path) -> Result<(S, HashMap<String, Tensor>)> {
    let bad = |m: String| Error::Checkpoint(format!("{}: {m}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
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
