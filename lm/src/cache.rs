//! The key/value cache: one preallocated buffer per layer, written in place.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Keys and values of every layer for the positions seen so far.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer: `(keys, values)`, each `[batch, kv_heads, capacity, head_dim]`.
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Positions filled (the same for every layer once a forward pass is complete).
    len: usize,
    /// Positions to reserve on the first write.
    reserve: usize,
    /// The token ids and position ids fed so far, each `[batch, len]` int64, when the model
    /// may have to run them again ([`KvCache::keeping_tokens`]); `None` before the first pass.
    tokens: Option<(Tensor, Tensor)>,
    keeps_tokens: bool,
}

impl KvCache {
    /// An empty cache for `num_layers` layers that reserves room for `capacity` positions
    /// (it grows past that if needed).
    pub fn new(num_layers: usize, capacity: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            reserve: capacity,
            tokens: None,
            keeps_tokens: false,
        }
    }

    /// This cache, also keeping the ids and positions it is fed: for Phi-3's LongRoPE, whose
    /// first forward pass past the pretraining length runs the whole sequence again
    /// ([`crate::CausalLm::forward_hidden`]).
    pub(crate) fn keeping_tokens(mut self) -> Self {
        self.keeps_tokens = true;
        self
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
        let (kb, vb) = self.room(layer, &k.size(), (k.kind(), k.device()), new)?;
        kb.f_narrow(2, start, new)?.f_copy_(k)?;
        vb.f_narrow(2, start, new)?.f_copy_(v)?;
        Ok((
            kb.f_narrow(2, 0, start + new)?,
            vb.f_narrow(2, 0, start + new)?,
        ))
    }

    /// The key and value buffers `[batch, kv_heads, capacity, head_dim]` of layer `layer`,
    /// with room for `new` positions after [`KvCache::len`] (allocated as `size`
    /// `[batch, kv_heads, _, head_dim]` with `options` when they grow): the new keys and values
    /// are written from position `len` on.
    pub(crate) fn room(
        &mut self,
        layer: usize,
        size: &[i64],
        options: (Kind, Device),
        new: i64,
    ) -> Result<&mut (Tensor, Tensor)> {
        let start = self.len as i64;
        let needed = start + new;
        let reserve = self.reserve as i64;
        let slot = &mut self.layers[layer];
        let capacity = slot.as_ref().map_or(0, |(kb, _)| kb.size()[2]);
        if capacity < needed {
            // Grow to the reserve, the need, or double the old size, whichever is largest.
            let mut size = size.to_vec();
            size[2] = needed.max(reserve).max(2 * capacity);
            let alloc = || Tensor::f_zeros(&size, options);
            let (kb, vb) = (alloc()?, alloc()?);
            if let Some((old_k, old_v)) = slot.take() {
                kb.f_narrow(2, 0, start)?
                    .f_copy_(&old_k.f_narrow(2, 0, start)?)?;
                vb.f_narrow(2, 0, start)?
                    .f_copy_(&old_v.f_narrow(2, 0, start)?)?;
            }
            *slot = Some((kb, vb));
        }
        slot.as_mut()
            .ok_or_else(|| Error::Kernel("a cache layer was not allocated".into()))
    }

    /// A copy of this cache with every row repeated `times` times in place (row `r` becomes
    /// rows `r * times..(r + 1) * times`): the shared prefix of `times` continuations each.
    pub fn repeat_rows(&self, times: usize) -> Result<Self> {
        self.map_rows(|t| t.f_repeat_interleave_self_int(times as i64, 0, None::<i64>))
    }

    /// A copy of this cache made of the rows `rows` (int64 indices on the cache's device, in
    /// any order, repeats allowed): e.g. several continuations of each of several prefixes.
    pub fn select_rows(&self, rows: &Tensor) -> Result<Self> {
        self.map_rows(|t| t.f_index_select(0, rows))
    }

    /// A copy of this cache with `rows` applied to every row-major tensor it holds (keys,
    /// values and, if kept, token ids and positions): the rows change, the positions do not.
    fn map_rows(&self, rows: impl Fn(&Tensor) -> Result<Tensor, tch::TchError>) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|layer| match layer {
                Some((k, v)) => Ok(Some((rows(k)?, rows(v)?))),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let tokens = match &self.tokens {
            Some((ids, pos)) => Some((rows(ids)?, rows(pos)?)),
            None => None,
        };
        Ok(Self {
            layers,
            len: self.len,
            reserve: self.reserve,
            tokens,
            keeps_tokens: self.keeps_tokens,
        })
    }

    /// Overwrites positions `from..len` of every row `i` with those of row `source[i]` (int64,
    /// one entry per row, on the cache's device): after k candidates were fed to k copies of a
    /// row, every copy takes the chosen one's keys and values.
    pub fn copy_rows(&mut self, source: &Tensor, from: usize) -> Result<()> {
        let (start, count) = (from as i64, (self.len - from.min(self.len)) as i64);
        let copy = |buffer: &Tensor, dim: i64| -> Result<()> {
            let mut span = buffer.f_narrow(dim, start, count)?;
            let chosen = span.f_index_select(0, source)?;
            span.f_copy_(&chosen)?;
            Ok(())
        };
        for (kb, vb) in self.layers.iter().flatten() {
            copy(kb, 2)?;
            copy(vb, 2)?;
        }
        if let Some((ids, pos)) = &self.tokens {
            copy(ids, 1)?;
            copy(pos, 1)?;
        }
        Ok(())
    }

    /// Joins caches row-wise (rows of `parts[0]` first), each part left-padded with zeros to
    /// the longest part's length: the cache of a batch that rows join mid-decoding (continuous
    /// batching). The padding must be masked out of attention by the caller's key mask, as for
    /// a left-padded prompt batch. Parts that hold nothing yet are skipped. A cache that keeps
    /// its tokens (LongRoPE) keeps them joined, the padding fed as id 0 at position 1 (as a
    /// left-padded prompt's).
    pub fn join_rows(parts: &[&KvCache]) -> Result<Self> {
        let keeps_tokens = parts.iter().any(|c| c.keeps_tokens);
        let filled: Vec<&KvCache> = parts.iter().copied().filter(|c| !c.is_empty()).collect();
        let (Some(first), Some(len)) = (filled.first(), filled.iter().map(|c| c.len).max()) else {
            let first = parts.first().map_or(0, |c| c.layers.len());
            let mut empty = Self::new(first, parts.first().map_or(0, |c| c.reserve));
            empty.keeps_tokens = keeps_tokens;
            return Ok(empty);
        };
        let reserve = filled.iter().map(|c| c.reserve).max().unwrap_or(0);
        // Room for the next steps; `append` grows it when needed.
        let capacity = (len + 64) as i64;
        let mut layers = Vec::with_capacity(first.layers.len());
        for layer in 0..first.layers.len() {
            let mut keys = Vec::with_capacity(filled.len());
            let mut values = Vec::with_capacity(filled.len());
            for part in &filled {
                let Some((k, v)) = &part.layers[layer] else {
                    return Err(crate::Error::InvalidGeneration(format!(
                        "cache layer {layer} is empty in a part holding {} positions",
                        part.len
                    )));
                };
                let pad = (len - part.len) as i64;
                let place = |t: &Tensor| -> Result<Tensor> {
                    let mut size = t.size();
                    size[2] = capacity;
                    let out = Tensor::f_zeros(&size, (t.kind(), t.device()))?;
                    out.f_narrow(2, pad, part.len as i64)?.f_copy_(&t.f_narrow(
                        2,
                        0,
                        part.len as i64,
                    )?)?;
                    Ok(out)
                };
                keys.push(place(k)?);
                values.push(place(v)?);
            }
            layers.push(Some((Tensor::f_cat(&keys, 0)?, Tensor::f_cat(&values, 0)?)));
        }
        let tokens = if keeps_tokens {
            let mut ids = Vec::with_capacity(filled.len());
            let mut positions = Vec::with_capacity(filled.len());
            for part in &filled {
                let Some((i, p)) = &part.tokens else {
                    return Err(crate::Error::InvalidGeneration(
                        "joining a cache that kept no tokens to one that keeps them".to_owned(),
                    ));
                };
                let pad = (len - part.len) as i64;
                let rows = i.size()[0];
                let left = |value: i64| Tensor::f_full([rows, pad], value, (i.kind(), i.device()));
                ids.push(Tensor::f_cat(&[&left(0)?, i], 1)?);
                positions.push(Tensor::f_cat(&[&left(1)?, p], 1)?);
            }
            Some((Tensor::f_cat(&ids, 0)?, Tensor::f_cat(&positions, 0)?))
        } else {
            None
        };
        Ok(Self {
            layers,
            len,
            reserve,
            tokens,
            keeps_tokens,
        })
    }

    /// Drops the first `count` positions of every row (e.g. columns that are padding for every
    /// row left in a continuous batch).
    pub fn drop_front(&mut self, count: usize) -> Result<()> {
        let count = count.min(self.len);
        if count == 0 {
            return Ok(());
        }
        let kept = (self.len - count) as i64;
        for (kb, vb) in self.layers.iter_mut().flatten() {
            for buffer in [kb, vb] {
                let moved = buffer.f_narrow(2, count as i64, kept)?.f_contiguous()?;
                buffer.f_narrow(2, 0, kept)?.f_copy_(&moved)?;
            }
        }
        if let Some((ids, positions)) = &mut self.tokens {
            *ids = ids.f_narrow(1, count as i64, kept)?;
            *positions = positions.f_narrow(1, count as i64, kept)?;
        }
        self.len -= count;
        Ok(())
    }

    /// Marks `new` positions as written by every layer (called once per forward pass).
    pub(crate) fn advance(&mut self, new: usize) {
        self.len += new;
    }

    /// Records the ids and positions `[batch, new]` of a forward pass, if this cache keeps them.
    pub(crate) fn record(&mut self, input_ids: &Tensor, position_ids: &Tensor) -> Result<()> {
        if !self.keeps_tokens {
            return Ok(());
        }
        self.tokens = Some(match self.tokens.take() {
            Some((ids, pos)) => (
                Tensor::f_cat(&[&ids, input_ids], 1)?,
                Tensor::f_cat(&[&pos, position_ids], 1)?,
            ),
            // `cat` copies: rows copied in place later never write into the caller's input.
            None => (
                Tensor::f_cat(&[input_ids], 1)?,
                Tensor::f_cat(&[position_ids], 1)?,
            ),
        });
        Ok(())
    }

    /// Empties the cache (its buffers stay allocated) and returns the ids and positions it was
    /// fed, `None` if it kept none.
    pub(crate) fn restart(&mut self) -> Option<(Tensor, Tensor)> {
        let tokens = self.tokens.take()?;
        self.len = 0;
        Some(tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn grows_past_its_reserve_and_keeps_what_it_held() -> Result<()> {
        let mut cache = KvCache::new(1, 1);
        let mut all = Vec::new();
        for step in 0..5i64 {
            let new = 1 + step % 2; // 1 or 2 positions per call
            let k = Tensor::f_rand([2, 3, new, 4], (Kind::Float, Device::Cpu))?;
            let (keys, values) = cache.append(0, &k, &(&k * 2.0))?;
            cache.advance(new as usize);
            all.push(k);
            let want = Tensor::f_cat(&all, 2)?;
            assert_eq!(keys.size(), want.size());
            assert!(keys.f_equal(&want)?);
            assert!(values.f_equal(&(&want * 2.0))?);
        }
        assert_eq!(cache.len(), 7);
        Ok(())
    }

    #[test]
    fn selected_rows_copy_the_rows_asked_for_in_order() -> Result<()> {
        let mut cache = KvCache::new(2, 4);
        let k = Tensor::f_arange(3 * 2 * 2, (Kind::Float, Device::Cpu))?.f_view([3, 1, 2, 2])?;
        for layer in 0..2 {
            let _ = cache.append(layer, &k, &(&k * 10.0))?;
        }
        cache.advance(2);
        let rows = Tensor::from_slice(&[2i64, 0, 0, 1]);
        let mut picked = cache.select_rows(&rows)?;
        assert_eq!(picked.len(), 2);
        let new = Tensor::f_zeros([4, 1, 1, 2], (Kind::Float, Device::Cpu))?;
        let (keys, values) = picked.append(1, &new, &new)?;
        assert!(keys
            .f_narrow(2, 0, 2)?
            .f_equal(&k.f_index_select(0, &rows)?)?);
        assert!(values
            .f_narrow(2, 0, 2)?
            .f_equal(&(k.f_index_select(0, &rows)? * 10.0))?);
        Ok(())
    }

    #[test]
    fn joined_rows_are_right_aligned_and_front_columns_drop() -> Result<()> {
        let filled = |rows: i64, len: i64, base: f64| -> Result<KvCache> {
            let mut cache = KvCache::new(1, 2);
            let k = (Tensor::f_arange(rows * len, (Kind::Float, Device::Cpu))? + base)
                .f_view([rows, 1, len, 1])?;
            let _ = cache.append(0, &k, &(&k * -1.0))?;
            cache.advance(len as usize);
            Ok(cache)
        };
        let (a, b) = (filled(1, 3, 0.0)?, filled(2, 1, 100.0)?);
        let mut joined = KvCache::join_rows(&[&a, &KvCache::new(1, 2), &b])?;
        assert_eq!(joined.len(), 3);
        let column = |c: &mut KvCache| -> Result<Vec<f32>> {
            let empty = Tensor::f_zeros([3, 1, 0, 1], (Kind::Float, Device::Cpu))?;
            let (keys, values) = c.append(0, &empty, &empty)?;
            assert!(values.f_equal(&(&keys * -1.0))?);
            Ok(Vec::<f32>::try_from(keys.f_flatten(0, -1)?)?)
        };
        // Row 0 as it was; rows 1 and 2 (one position each) at the right, zeros before.
        assert_eq!(
            column(&mut joined)?,
            vec![0.0, 1.0, 2.0, 0.0, 0.0, 100.0, 0.0, 0.0, 101.0]
        );
        // It keeps growing like any cache.
        let new = Tensor::f_full([3, 1, 2, 1], 7.0, (Kind::Float, Device::Cpu))?;
        let _ = joined.append(0, &new, &(&new * -1.0))?;
        joined.advance(2);
        joined.drop_front(2)?;
        assert_eq!(joined.len(), 3);
        assert_eq!(
            column(&mut joined)?,
            vec![2.0, 7.0, 7.0, 100.0, 7.0, 7.0, 101.0, 7.0, 7.0]
        );
        Ok(())
    }

    #[test]
    fn repeated_rows_take_the_chosen_copy_from_a_position_on() -> Result<()> {
        let mut cache = KvCache::new(1, 4);
        let k = Tensor::f_arange(2 * 2 * 3, (Kind::Float, Device::Cpu))?.f_view([2, 1, 3, 2])?;
        let _ = cache.append(0, &k, &(&k * 10.0))?;
        cache.advance(3);
        let mut wide = cache.repeat_rows(3)?; // rows 0,0,0,1,1,1
        assert_eq!(wide.len(), 3);
        let new = Tensor::f_arange(6, (Kind::Float, Device::Cpu))?.f_view([6, 1, 1, 1])?;
        let new = new.f_expand([6, 1, 1, 2], false)?.f_contiguous()?;
        let (keys, _) = wide.append(0, &new, &new)?;
        wide.advance(1);
        assert!(keys
            .f_narrow(2, 0, 3)?
            .f_equal(&k.f_repeat_interleave_self_int(3, 0, None::<i64>)?)?);
        // Row group 0 chooses its copy 2, group 1 its copy 0.
        let source = Tensor::from_slice(&[2i64, 2, 2, 3, 3, 3]);
        wide.copy_rows(&source, 3)?;
        let (keys, values) = wide.append(0, &new.f_narrow(2, 0, 0)?, &new.f_narrow(2, 0, 0)?)?;
        let last = Vec::<f32>::try_from(keys.f_select(2, 3)?.f_select(2, 0)?.f_flatten(0, -1)?)?;
        assert_eq!(last, vec![2.0, 2.0, 2.0, 3.0, 3.0, 3.0]);
        let last = Vec::<f32>::try_from(values.f_select(2, 3)?.f_select(2, 0)?.f_flatten(0, -1)?)?;
        assert_eq!(last, vec![2.0, 2.0, 2.0, 3.0, 3.0, 3.0]);
        // The prefix is untouched.
        assert!(keys
            .f_narrow(2, 0, 3)?
            .f_equal(&k.f_repeat_interleave_self_int(3, 0, None::<i64>)?)?);
        Ok(())
    }

    /// Feeds `ids` `[rows, new]` (positions 0, 1, ...) to layer 0 of `cache`.
    fn feed(cache: &mut KvCache, ids: &[&[i64]]) -> Result<()> {
        let (rows, new) = (ids.len() as i64, ids[0].len() as i64);
        let flat: Vec<i64> = ids.concat();
        let ids = Tensor::from_slice(&flat).f_view([rows, new])?;
        let start = cache.len() as i64;
        let positions = Tensor::f_arange_start(start, start + new, (Kind::Int64, Device::Cpu))?
            .f_expand([rows, new], false)?;
        let kv = Tensor::f_zeros([rows, 1, new, 2], (Kind::Float, Device::Cpu))?;
        let _ = cache.append(0, &kv, &kv)?;
        cache.advance(new as usize);
        cache.record(&ids, &positions)
    }

    #[test]
    fn kept_tokens_follow_row_copies_until_a_restart() -> Result<()> {
        let mut cache = KvCache::new(1, 4).keeping_tokens();
        feed(&mut cache, &[&[10, 11], &[20, 21]])?;
        let mut wide = cache.repeat_rows(2)?;
        feed(&mut wide, &[&[1], &[2], &[3], &[4]])?;
        // Each group takes its second candidate.
        wide.copy_rows(&Tensor::from_slice(&[1i64, 1, 3, 3]), 2)?;
        let picked = wide.select_rows(&Tensor::from_slice(&[2i64, 0]))?;
        let (ids, positions) = wide.restart().expect("kept tokens");
        assert!(wide.is_empty());
        let ids = Vec::<i64>::try_from(ids.f_flatten(0, -1)?)?;
        assert_eq!(ids, [10, 11, 2, 10, 11, 2, 20, 21, 4, 20, 21, 4]);
        assert_eq!(Vec::<i64>::try_from(positions.f_get(3)?)?, [0, 1, 2]);
        let (ids, _) = picked.tokens.expect("kept tokens");
        assert_eq!(
            Vec::<i64>::try_from(ids.f_flatten(0, -1)?)?,
            [20, 21, 4, 10, 11, 2]
        );
        // A cache that keeps nothing cannot restart, and stays as it was.
        let mut plain = KvCache::new(1, 4);
        feed(&mut plain, &[&[10, 11]])?;
        assert!(plain.restart().is_none());
        assert_eq!(plain.len(), 2);
        Ok(())
    }
}
