//! Parsing the header of a GGUF file (v2 and v3, little-endian): magic, version, metadata and
//! tensor infos, and where the tensor data starts.
//!
//! Layout (all integers little-endian):
//! ```text
//! "GGUF" | version u32 | tensor_count u64 | kv_count u64
//! kv_count x   key: string | value_type u32 | value
//! tensor_count x   name: string | n_dims u32 | dims: n_dims x u64 (fastest first)
//!                  | ggml_type u32 | offset u64 (from the data section's start)
//! padding to `general.alignment` (default 32) | tensor data
//! ```
//! A string is a u64 byte length and that many UTF-8 bytes; an array is an element type u32,
//! a u64 count and the elements.
//!
//! The file is untrusted: every count and length is checked against the bytes left before
//! anything is allocated for it (a count of `n` elements needs at least `n` times the smallest
//! element's size), dimensions are multiplied with overflow checks, and every tensor's byte
//! range must lie inside the file.

use std::collections::HashSet;

use crate::error::FormatError;
use crate::ggml_type::GgmlType;
use crate::metadata::{Array, Metadata, Value, ValueType};

/// The alignment of the tensor data when the file sets no `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The most dimensions a ggml tensor has.
pub const MAX_DIMS: usize = 4;

/// How deep metadata arrays may nest (arrays of arrays of ...); bounds the parser's recursion.
pub const MAX_NESTING: usize = 8;

/// The smallest encoding of a tensor info: an empty name (8), the dimension count (4, and no
/// dimensions: refused later, by name), the type (4) and the offset (8).
const MIN_TENSOR_INFO: u64 = 24;

/// The smallest encoding of a key/value pair: an empty key (8), the type (4), a 1-byte value.
const MIN_KV: u64 = 13;

/// One tensor of a GGUF file: where its data lies and how it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as GGUF lists them, fastest-varying first: an HF `[out, in]` weight is
    /// `[in, out]` here. One to four of them, none zero.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Start of the data, from the start of the file (the data section's start plus the
    /// tensor's offset in it).
    pub start: u64,
    /// Length of the data in bytes.
    pub n_bytes: u64,
    /// Number of elements (the product of the dimensions).
    pub n_elements: u64,
}

impl TensorInfo {
    /// The shape in row-major order (slowest first), as torch and safetensors list it.
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }

    /// Elements per row (the fastest dimension); a row is a whole number of blocks.
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> u64 {
        let blocks = self.row_len() / self.ggml_type.block_size() as u64;
        blocks * self.ggml_type.type_size() as u64
    }
}

/// The parsed header of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Where the tensor data section starts, in bytes from the start of the file.
    pub data_start: u64,
}

/// Parses the header of the GGUF file `bytes` (the whole file) and checks every tensor's byte
/// range against its length.
pub fn parse(bytes: &[u8]) -> Result<Header, FormatError> {
    let mut r = Reader { bytes, pos: 0 };
    let magic = r.take(4, "magic")?;
    if magic != b"GGUF" {
        return Err(FormatError::Magic {
            found: magic.to_vec(),
        });
    }
    let version = r.u32("version")?;
    if version != 2 && version != 3 {
        return Err(if matches!(version.swap_bytes(), 2 | 3) {
            FormatError::BigEndian
        } else {
            FormatError::Version { version }
        });
    }
    let tensor_count = r.u64("tensor count")?;
    let kv_count = r.u64("metadata count")?;
    r.check_count(kv_count, MIN_KV, "metadata entries")?;
    let metadata = read_metadata(&mut r, kv_count)?;
    r.check_count(tensor_count, MIN_TENSOR_INFO, "tensor infos")?;
    let raw = (0..tensor_count)
        .map(|_| read_tensor_info(&mut r))
        .collect::<Result<Vec<_>, _>>()?;
    let alignment = alignment(&metadata)?;
    let data_start = align_up(r.pos as u64, alignment).ok_or(FormatError::Alignment {
        found: alignment.to_string(),
    })?;
    let tensors = locate_tensors(raw, data_start, alignment, bytes.len() as u64)?;
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}

/// A tensor info as read, before its place in the file is checked.
struct RawTensorInfo {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    offset: u64,
}

fn read_metadata(r: &mut Reader<'_>, count: u64) -> Result<Metadata, FormatError> {
    // `count` was checked against the bytes left, so this allocation is bounded by the file.
    let mut entries = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for _ in 0..count {
        let key = r.string("metadata key")?;
        let at = r.pos as u64;
        let id = r.u32("metadata value type")?;
        let ty = ValueType::from_id(id).ok_or_else(|| FormatError::ValueType {
            key: key.clone(),
            id,
            offset: at,
        })?;
        let value = read_value(r, &key, ty, 0)?;
        entries.push((key, value));
    }
    Metadata::build(entries).map_err(|key| FormatError::DuplicateKey { key })
}

fn read_value(
    r: &mut Reader<'_>,
    key: &str,
    ty: ValueType,
    depth: usize,
) -> Result<Value, FormatError> {
    Ok(match ty {
        ValueType::U8 => Value::U8(r.array::<1>("u8 value")?[0]),
        ValueType::I8 => Value::I8(i8::from_le_bytes(r.array("i8 value")?)),
        ValueType::U16 => Value::U16(u16::from_le_bytes(r.array("u16 value")?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(r.array("i16 value")?)),
        ValueType::U32 => Value::U32(r.u32("u32 value")?),
        ValueType::I32 => Value::I32(i32::from_le_bytes(r.array("i32 value")?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(r.array("f32 value")?)),
        ValueType::Bool => Value::Bool(r.array::<1>("bool value")?[0] != 0),
        ValueType::String => Value::String(r.string("string value")?),
        ValueType::Array => Value::Array(read_array(r, key, depth + 1)?),
        ValueType::U64 => Value::U64(r.u64("u64 value")?),
        ValueType::I64 => Value::I64(i64::from_le_bytes(r.array("i64 value")?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(r.array("f64 value")?)),
    })
}

fn read_array(r: &mut Reader<'_>, key: &str, depth: usize) -> Result<Array, FormatError> {
    let at = r.pos as u64;
    if depth > MAX_NESTING {
        return Err(FormatError::Nesting {
            key: key.to_owned(),
            max: MAX_NESTING,
            offset: at,
        });
    }
    let id = r.u32("array element type")?;
    let ty = ValueType::from_id(id).ok_or_else(|| FormatError::ValueType {
        key: key.to_owned(),
        id,
        offset: at,
    })?;
    let count = r.u64("array length")?;
    let min_size = match ty {
        ValueType::String => 8,
        ValueType::Array => 12,
        fixed => fixed.fixed_size().unwrap_or(1) as u64,
    };
    r.check_count(count, min_size, "array elements")
        .map_err(|_| FormatError::ArrayCount {
            key: key.to_owned(),
            count,
            offset: r.pos as u64,
            left: r.left(),
        })?;
    // Checked above: `count` elements fit in the bytes left, so `count` fits in usize.
    let n = usize::try_from(count).unwrap_or(0);
    Ok(match ty {
        ValueType::U8 => Array::U8(r.fixed(n, "u8 array", |b: [u8; 1]| b[0])?),
        ValueType::I8 => Array::I8(r.fixed(n, "i8 array", i8::from_le_bytes)?),
        ValueType::U16 => Array::U16(r.fixed(n, "u16 array", u16::from_le_bytes)?),
        ValueType::I16 => Array::I16(r.fixed(n, "i16 array", i16::from_le_bytes)?),
        ValueType::U32 => Array::U32(r.fixed(n, "u32 array", u32::from_le_bytes)?),
        ValueType::I32 => Array::I32(r.fixed(n, "i32 array", i32::from_le_bytes)?),
        ValueType::F32 => Array::F32(r.fixed(n, "f32 array", f32::from_le_bytes)?),
        ValueType::Bool => Array::Bool(r.fixed(n, "bool array", |b: [u8; 1]| b[0] != 0)?),
        ValueType::U64 => Array::U64(r.fixed(n, "u64 array", u64::from_le_bytes)?),
        ValueType::I64 => Array::I64(r.fixed(n, "i64 array", i64::from_le_bytes)?),
        ValueType::F64 => Array::F64(r.fixed(n, "f64 array", f64::from_le_bytes)?),
        ValueType::String => Array::String(
            (0..n)
                .map(|_| r.string("string array element"))
                .collect::<Result<_, _>>()?,
        ),
        ValueType::Array => Array::Array(
            (0..n)
                .map(|_| read_array(r, key, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
    })
}

fn read_tensor_info(r: &mut Reader<'_>) -> Result<RawTensorInfo, FormatError> {
    let name = r.string("tensor name")?;
    let n_dims = r.u32("tensor dimension count")?;
    if n_dims == 0 || n_dims as usize > MAX_DIMS {
        return Err(FormatError::Dims {
            tensor: name,
            n_dims,
        });
    }
    let dims = r.fixed(n_dims as usize, "tensor dimensions", u64::from_le_bytes)?;
    let type_id = r.u32("tensor type")?;
    let offset = r.u64("tensor offset")?;
    Ok(RawTensorInfo {
        name,
        dims,
        type_id,
        offset,
    })
}

/// `general.alignment`: a u32 power of two, or the default.
fn alignment(metadata: &Metadata) -> Result<u64, FormatError> {
    match metadata.get("general.alignment") {
        None => Ok(DEFAULT_ALIGNMENT),
        Some(Value::U32(a)) if a.is_power_of_two() => Ok(u64::from(*a)),
        Some(Value::U32(a)) => Err(FormatError::Alignment {
            found: a.to_string(),
        }),
        Some(other) => Err(FormatError::Alignment {
            found: other.type_name().to_owned(),
        }),
    }
}

fn align_up(pos: u64, alignment: u64) -> Option<u64> {
    pos.checked_next_multiple_of(alignment)
}

/// Checks each tensor's dimensions, type and byte range, and places it in the file.
fn locate_tensors(
    raw: Vec<RawTensorInfo>,
    data_start: u64,
    alignment: u64,
    file_len: u64,
) -> Result<Vec<TensorInfo>, FormatError> {
    let mut names = HashSet::with_capacity(raw.len());
    let mut tensors = Vec::with_capacity(raw.len());
    for t in raw {
        if !names.insert(t.name.clone()) {
            return Err(FormatError::DuplicateTensor { tensor: t.name });
        }
        tensors.push(locate_tensor(t, data_start, alignment, file_len)?);
    }
    Ok(tensors)
}

fn locate_tensor(
    t: RawTensorInfo,
    data_start: u64,
    alignment: u64,
    file_len: u64,
) -> Result<TensorInfo, FormatError> {
    if t.dims.contains(&0) {
        return Err(FormatError::ZeroDim {
            tensor: t.name,
            dims: t.dims,
        });
    }
    let Some(ggml_type) = GgmlType::from_id(t.type_id) else {
        return Err(FormatError::UnknownType {
            tensor: t.name,
            id: t.type_id,
        });
    };
    let n_elements = t.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
    let Some(n_elements) = n_elements else {
        return Err(FormatError::Overflow {
            tensor: t.name,
            dims: t.dims,
        });
    };
    let row = t.dims.first().copied().unwrap_or(1);
    let block = ggml_type.block_size();
    if !row.is_multiple_of(block as u64) {
        return Err(FormatError::Blocks {
            tensor: t.name,
            ggml_type,
            row,
            block,
        });
    }
    // No overflow: the element count fits in u64 and type_size / block_size <= 4.
    let n_bytes = (n_elements / block as u64).checked_mul(ggml_type.type_size() as u64);
    let start = data_start.checked_add(t.offset);
    let end = start.zip(n_bytes).and_then(|(s, n)| s.checked_add(n));
    let (Some(start), Some(n_bytes), Some(end)) = (start, n_bytes, end) else {
        return Err(FormatError::Overflow {
            tensor: t.name,
            dims: t.dims,
        });
    };
    if !t.offset.is_multiple_of(alignment) {
        return Err(FormatError::Misaligned {
            tensor: t.name,
            offset: t.offset,
            alignment,
        });
    }
    if end > file_len {
        return Err(FormatError::OutOfFile {
            tensor: t.name,
            start,
            end,
            len: file_len,
        });
    }
    Ok(TensorInfo {
        name: t.name,
        dims: t.dims,
        ggml_type,
        start,
        n_bytes,
        n_elements,
    })
}

/// A position in the file's bytes; every read is checked against the bytes left.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> u64 {
        self.bytes.len().saturating_sub(self.pos) as u64
    }

    /// The next `n` bytes.
    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], FormatError> {
        let truncated = || FormatError::Truncated {
            what,
            offset: self.pos as u64,
            needed: n,
            left: self.left(),
        };
        let n = usize::try_from(n).map_err(|_| truncated())?;
        let end = self.pos.checked_add(n).ok_or_else(truncated)?;
        let slice = self.bytes.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FormatError> {
        let slice = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FormatError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FormatError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A u64 length and that many UTF-8 bytes.
    fn string(&mut self, what: &'static str) -> Result<String, FormatError> {
        let len = self.u64(what)?;
        let at = self.pos as u64;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FormatError::Utf8 { what, offset: at })
    }

    /// `n` fixed-size values of `N` bytes each, read in one checked step.
    fn fixed<const N: usize, T>(
        &mut self,
        n: usize,
        what: &'static str,
        decode: impl Fn([u8; N]) -> T,
    ) -> Result<Vec<T>, FormatError> {
        let len = (n as u64).saturating_mul(N as u64);
        let bytes = self.take(len, what)?;
        let (chunks, _) = bytes.as_chunks::<N>();
        Ok(chunks.iter().map(|c| decode(*c)).collect())
    }

    /// Refuses a count of `count` items of at least `min_size` bytes each that cannot fit in
    /// the bytes left, before anything is allocated for them.
    fn check_count(
        &self,
        count: u64,
        min_size: u64,
        what: &'static str,
    ) -> Result<(), FormatError> {
        match count.checked_mul(min_size) {
            Some(need) if need <= self.left() => Ok(()),
            _ => Err(FormatError::Count {
                what,
                count,
                offset: self.pos as u64,
                left: self.left(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF file assembled from parts: `kvs` and `infos` are already encoded.
    fn file(
        version: u32,
        n_tensors: u64,
        n_kvs: u64,
        kvs: &[u8],
        infos: &[u8],
        data: &[u8],
    ) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(version.to_le_bytes());
        out.extend(n_tensors.to_le_bytes());
        out.extend(n_kvs.to_le_bytes());
        out.extend(kvs);
        out.extend(infos);
        out.resize(out.len().next_multiple_of(32), 0);
        out.extend(data);
        out
    }

    fn string(s: &str) -> Vec<u8> {
        let mut out = (s.len() as u64).to_le_bytes().to_vec();
        out.extend(s.as_bytes());
        out
    }

    fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
        [string(key), ty.to_le_bytes().to_vec(), value.to_vec()].concat()
    }

    fn info(name: &str, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
        let mut out = string(name);
        out.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        out
    }

    /// A valid v3 file: `general.architecture = "llama"` and one F32 tensor `w` of 4 values.
    fn valid() -> Vec<u8> {
        let kvs = kv("general.architecture", 8, &string("llama"));
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        file(3, 1, 1, &kvs, &info("w", &[2, 2], 0, 0), &data)
    }

    fn problem(bytes: &[u8]) -> String {
        parse(bytes).expect_err("a bad file").to_string()
    }

    #[test]
    fn a_valid_file_is_read_in_v2_and_v3() {
        for version in [2u32, 3] {
            let mut bytes = valid();
            bytes[4..8].copy_from_slice(&version.to_le_bytes());
            let h = parse(&bytes).expect("valid");
            assert_eq!(h.version, version);
            assert_eq!(h.metadata.architecture().expect("arch"), "llama");
            // 24 + 45 (the key/value) + 41 (the tensor info) = 110, aligned up to 128.
            assert_eq!((h.alignment, h.data_start), (32, 128));
            let t = &h.tensors[0];
            assert_eq!((t.name.as_str(), t.ggml_type), ("w", GgmlType::F32));
            assert_eq!((t.start, t.n_bytes, t.n_elements), (128, 16, 4));
            assert_eq!(
                (t.dims.clone(), t.shape(), t.row_bytes()),
                (vec![2, 2], vec![2, 2], 8)
            );
        }
    }

    #[test]
    fn every_value_type_is_read_including_nested_arrays() {
        let nested = [
            9u32.to_le_bytes().to_vec(), // array of arrays
            2u64.to_le_bytes().to_vec(),
            4u32.to_le_bytes().to_vec(), // [u32; 2]
            2u64.to_le_bytes().to_vec(),
            7u32.to_le_bytes().to_vec(),
            8u32.to_le_bytes().to_vec(),
            8u32.to_le_bytes().to_vec(), // [string; 1]
            1u64.to_le_bytes().to_vec(),
            string("x"),
        ]
        .concat();
        let kvs = [
            kv("u8", 0, &[200]),
            kv("i8", 1, &[0xFF]),
            kv("u16", 2, &500u16.to_le_bytes()),
            kv("i16", 3, &(-500i16).to_le_bytes()),
            kv("u32", 4, &70000u32.to_le_bytes()),
            kv("i32", 5, &(-70000i32).to_le_bytes()),
            kv("f32", 6, &0.5f32.to_le_bytes()),
            kv("bool", 7, &[1]),
            kv("string", 8, &string("héllo")),
            kv("array", 9, &nested),
            kv("u64", 10, &u64::MAX.to_le_bytes()),
            kv("i64", 11, &i64::MIN.to_le_bytes()),
            kv("f64", 12, &0.25f64.to_le_bytes()),
        ]
        .concat();
        let h = parse(&file(3, 0, 13, &kvs, &[], &[])).expect("valid");
        let m = &h.metadata;
        let get = |k: &str| m.get(k).cloned().expect(k);
        assert_eq!(get("u8"), Value::U8(200));
        assert_eq!(get("i8"), Value::I8(-1));
        assert_eq!(get("u16"), Value::U16(500));
        assert_eq!(get("i16"), Value::I16(-500));
        assert_eq!(get("u32"), Value::U32(70000));
        assert_eq!(get("i32"), Value::I32(-70000));
        assert_eq!(get("f32"), Value::F32(0.5));
        assert_eq!(get("bool"), Value::Bool(true));
        assert_eq!(get("string"), Value::String("héllo".into()));
        assert_eq!(get("u64"), Value::U64(u64::MAX));
        assert_eq!(get("i64"), Value::I64(i64::MIN));
        assert_eq!(get("f64"), Value::F64(0.25));
        assert_eq!(
            get("array"),
            Value::Array(Array::Array(vec![
                Array::U32(vec![7, 8]),
                Array::String(vec!["x".into()])
            ]))
        );
        assert!(h.tensors.is_empty());
    }

    #[test]
    fn every_truncation_and_byte_flip_is_an_error_or_a_file_never_a_panic() {
        let bytes = valid();
        for len in 0..bytes.len() {
            assert!(parse(&bytes[..len]).is_err(), "prefix of {len} bytes");
        }
        // A deterministic walk of single-byte corruptions over the header.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut corrupt = bytes.clone();
            let at = (state % 128) as usize;
            corrupt[at] = (state >> 32) as u8;
            let _ = parse(&corrupt);
        }
    }

    #[test]
    fn wrong_magic_versions_and_byte_order_are_named() {
        let mut bytes = valid();
        bytes[..4].copy_from_slice(b"GGML");
        assert_eq!(
            problem(&bytes),
            "not a GGUF file (starts with [71, 71, 77, 76], expected \"GGUF\")"
        );
        let mut bytes = valid();
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            problem(&bytes),
            "GGUF version 1 is not supported (versions 2 and 3 are)"
        );
        bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(problem(&bytes), "big-endian GGUF files are not supported");
        assert_eq!(
            problem(b"GG"),
            "truncated: magic at byte 0 needs 4 bytes, 2 are left"
        );
    }

    #[test]
    fn absurd_counts_and_lengths_are_refused_before_allocating() {
        let kvs = kv("general.architecture", 8, &string("llama"));
        assert_eq!(
            problem(&file(3, u64::MAX, 1, &kvs, &[], &[])),
            format!(
                "{} tensor infos starting at byte 69 cannot fit in the 27 bytes left",
                u64::MAX
            )
        );
        assert_eq!(
            problem(&file(3, 0, 1 << 60, &kvs, &[], &[])),
            format!(
                "{} metadata entries starting at byte 24 cannot fit in the 72 bytes left",
                1u64 << 60
            )
        );
        let mut long_key = u64::MAX.to_le_bytes().to_vec();
        long_key.extend(b"k");
        assert_eq!(
            problem(&file(3, 0, 1, &long_key, &[], &[])),
            format!(
                "truncated: metadata key at byte 32 needs {} bytes, 32 are left",
                u64::MAX
            )
        );
        let array = [
            8u32.to_le_bytes().to_vec(),
            (1u64 << 61).to_le_bytes().to_vec(),
        ]
        .concat();
        assert_eq!(
            problem(&file(3, 0, 1, &kv("tokens", 9, &array), &[], &[])),
            format!(
                "metadata tokens: {} array elements starting at byte 54 cannot fit in the 10 bytes left",
                1u64 << 61
            )
        );
    }

    #[test]
    fn bad_metadata_is_named_by_key() {
        assert_eq!(
            problem(&file(3, 0, 1, &kv("k", 13, &[0; 8]), &[], &[])),
            "metadata k: unknown value type 13 at byte 33"
        );
        let two = [kv("k", 0, &[1]), kv("k", 0, &[2])].concat();
        assert_eq!(
            problem(&file(3, 0, 2, &two, &[], &[])),
            "metadata k: key appears twice"
        );
        let bad_utf8 = [
            2u64.to_le_bytes().to_vec(),
            vec![0xC3, 0x28],
            0u32.to_le_bytes().to_vec(),
            vec![0],
        ]
        .concat();
        assert_eq!(
            problem(&file(3, 0, 1, &bad_utf8, &[], &[])),
            "metadata key at byte 32 is not UTF-8"
        );
        // Arrays of arrays nested deeper than MAX_NESTING.
        let mut deep = Vec::new();
        for _ in 0..=MAX_NESTING {
            deep.extend(9u32.to_le_bytes());
            deep.extend(1u64.to_le_bytes());
        }
        deep.extend(0u32.to_le_bytes());
        deep.extend(0u64.to_le_bytes());
        assert!(problem(&file(3, 0, 1, &kv("deep", 9, &deep), &[], &[]))
            .starts_with("metadata deep: arrays nested deeper than 8"));
        for (value, found) in [
            (kv("general.alignment", 4, &48u32.to_le_bytes()), "48"),
            (kv("general.alignment", 10, &64u64.to_le_bytes()), "u64"),
        ] {
            assert_eq!(
                problem(&file(3, 0, 1, &value, &[], &[])),
                format!("general.alignment must be a u32 power of two, found {found}")
            );
        }
    }

    #[test]
    fn bad_tensor_infos_are_named_by_tensor() {
        let kvs = kv("general.architecture", 8, &string("llama"));
        let one = |info: Vec<u8>, data: &[u8]| problem(&file(3, 1, 1, &kvs, &info, data));
        assert_eq!(
            one(info("w", &[1; 5], 0, 0), &[]),
            "tensor w: 5 dimensions (1 to 4 are supported)"
        );
        assert_eq!(
            one(info("w", &[], 0, 0), &[]),
            "tensor w: 0 dimensions (1 to 4 are supported)"
        );
        assert_eq!(
            one(info("w", &[4, 0], 0, 0), &[]),
            "tensor w: a dimension is 0 in [4, 0]"
        );
        assert_eq!(
            one(info("w", &[1 << 32, 1 << 32], 0, 0), &[]),
            "tensor w: dimensions [4294967296, 4294967296] are too large"
        );
        assert_eq!(
            one(info("w", &[32], 99, 0), &[]),
            "tensor w: unknown ggml type id 99"
        );
        assert_eq!(
            one(info("w", &[33, 2], 8, 0), &[]),
            "tensor w: rows of 33 elements are not a whole number of Q8_0 blocks of 32"
        );
        assert_eq!(
            one(info("w", &[4], 0, 8), &[0; 64]),
            "tensor w: data offset 8 is not a multiple of the alignment 32"
        );
        assert_eq!(
            one(info("w", &[4], 0, 32), &[0; 40]),
            "tensor w: bytes 160..176 lie past the end of the file (168 bytes)"
        );
        let two = [info("w", &[4], 0, 0), info("w", &[4], 0, 0)].concat();
        assert_eq!(
            problem(&file(3, 2, 1, &kvs, &two, &[0; 16])),
            "tensor w: name appears twice"
        );
    }
}
