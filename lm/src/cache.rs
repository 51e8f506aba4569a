//! The key/value cache: one preallocated buffer per layer, written in place.

use tch::Tensor;

use crate::error::Result;

/// Keys and values of every layer for the positions seen so far.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer: `(keys, values)`, each `[batch, kv_heads, capacity, head_dim]`.
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Positions filled (the same for every layer once a forward pass is complete).
    len: usize,
    /// Positions to reserve on the first write.
    reserve: usize,
}

impl KvCache {
    /// An empty cache for `num_layers` layers that reserves room for `capacity` positions
    /// (it grows past that if needed).
    pub fn new(num_layers: usize, capacity: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            reserve: capacity,
        }
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stored yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v` `[batch, kv_heads, new, head_dim]` to layer `layer` and returns all keys
    /// and values of that layer so far, `[batch, kv_heads, len + new, head_dim]`.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let new = k.size()[2];
        let start = self.len as i64;
        let needed = start + new;
        let slot = &mut self.layers[layer];
        let grow = match slot {
            Some((kb, _)) => kb.size()[2] < needed,
            None => true,
        };
        if grow {
            let capacity = needed.max(self.reserve as i64).max(match slot {
                Some((kb, _)) => 2 * kb.size()[2],
                None => 0,
            });
            let alloc = |t: &Tensor| -> Result<Tensor> {
                let mut size = t.size();
                size[2] = capacity;
                let buf = Tensor::f_zeros(&size, (t.kind(), t.device()))?;
                Ok(buf)
            };
            let (kb, vb) = (alloc(k)?, alloc(v)?);
            if let Some((old_k, old_v)) = slot.take() {
                kb.f_narrow(2, 0, start)?
                    .f_copy_(&old_k.f_narrow(2, 0, start)?)?;
                vb.f_narrow(2, 0, start)?
                    .f_copy_(&old_v.f_narrow(2, 0, start)?)?;
            }
            *slot = Some((kb, vb));
        }
        let Some((kb, vb)) = slot.as_ref() else {
            unreachable!("the slot was filled above")
        };
        kb.f_narrow(2, start, new)?.f_copy_(k)?;
        vb.f_narrow(2, start, new)?.f_copy_(v)?;
        Ok((kb.f_narrow(2, 0, needed)?, vb.f_narrow(2, 0, needed)?))
    }

    /// Marks `new` positions as written by every layer (called once per forward pass).
    pub(crate) fn advance(&mut self, new: usize) {
        self.len += new;
    }
}
