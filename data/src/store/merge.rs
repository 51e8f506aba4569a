//! Joining stores of the same model and settings.

use std::path::Path;

use super::{temp_path, Result, Store, StoreError, StoreWriter};

/// Joins stores into `out` (written under a temporary name, renamed when complete), in the
/// order given. Refuses stores whose metadata is incompatible with the first one's.
pub fn merge(inputs: &[&Path], out: &Path) -> Result<usize> {
    let Some(first) = inputs.first() else {
        return Err(StoreError::NothingToMerge {
            out: out.to_owned(),
        });
    };
    let stores = inputs
        .iter()
        .map(|p| Store::open(p))
        .collect::<Result<Vec<_>>>()?;
    let meta = stores[0].meta().clone();
    for s in &stores[1..] {
        if let Some(why) = meta.incompatibility(s.meta()) {
            return Err(StoreError::Incompatible {
                path: s.path().to_owned(),
                first: first.to_path_buf(),
                why: Box::new(why),
            });
        }
    }
    let temp = temp_path(out);
    let result = (|| {
        let mut writer = StoreWriter::create(&temp, &meta)?;
        for s in &stores {
            copy_rollouts(s, &mut writer)?;
        }
        let n = writer.len();
        writer.finish()?;
        Ok(n)
    })();
    match result {
        Ok(n) => {
            std::fs::rename(&temp, out).map_err(|error| StoreError::Rename {
                path: out.to_owned(),
                temp: temp.clone(),
                error,
            })?;
            Ok(n)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// Copies every rollout of `store` into `writer`, a bounded number of rollouts at a time.
pub fn copy_rollouts(store: &Store, writer: &mut StoreWriter) -> Result<()> {
    const AT_ONCE: usize = 64;
    let mut batch = Vec::with_capacity(AT_ONCE);
    for i in 0..store.len() {
        batch.push(store.rollout(i)?);
        if batch.len() == AT_ONCE {
            writer.append(&batch)?;
            batch.clear();
        }
    }
    writer.append(&batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{rollouts, write};
    use crate::store::StateDtype;

    #[test]
    fn merge_refuses_incompatible_stores() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a.h5");
        let b = dir.path().join("b.h5");
        write(&a, StateDtype::F32, &rollouts(3)).expect("a");
        write(&b, StateDtype::F16, &rollouts(3)).expect("b");
        let out = dir.path().join("ab.h5");
        let err = merge(&[&a, &b], &out)
            .expect_err("dtypes differ")
            .to_string();
        assert!(err.contains("state dtype f16 differs from f32"), "{err}");
        assert!(!out.exists() && !temp_path(&out).exists());
        assert_eq!(merge(&[&a, &a], &out).expect("same meta"), 6);
    }
}
