//! GGUF metadata: the typed key/value pairs of a file's header (`general.architecture`,
//! `llama.block_count`, `tokenizer.ggml.tokens`, ...), and typed accessors over them.
//!
//! Accessors come in two kinds: `get_*` returns `Ok(None)` for a missing key and an error for a
//! value of the wrong type; `require_*` also refuses a missing key. Integer accessors accept
//! any integer type whose value fits (llama.cpp writes token ids as `u32`, other writers use
//! other widths); float accessors accept `f32` and `f64`.

use std::collections::HashMap;

use crate::{Error, Result};

/// The type of a metadata value, with its id in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    /// The type of id `id`, if it is one.
    pub fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The size in bytes of a value of this type, for fixed-size types.
    pub fn fixed_size(self) -> Option<usize> {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }

    /// Its name in messages: `u32`, `string`, ...
    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// An array value: its elements share one type; arrays may nest.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Value {
    /// The type of the value.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Its type in messages: `u32`, `array of string`, ...
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Array(a) => a.type_name(),
            other => other.value_type().name(),
        }
    }

    /// The value as an integer, if it is one (of any width and sign).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }
}

impl Array {
    /// The type of its elements.
    pub fn element_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::Array(_) => ValueType::Array,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its type in messages: `array of string`, ...
    pub fn type_name(&self) -> &'static str {
        use ValueType::*;
        match self.element_type() {
            U8 => "array of u8",
            I8 => "array of i8",
            U16 => "array of u16",
            I16 => "array of i16",
            U32 => "array of u32",
            I32 => "array of i32",
            F32 => "array of f32",
            Bool => "array of bool",
            String => "array of string",
            Array => "array of array",
            U64 => "array of u64",
            I64 => "array of i64",
            F64 => "array of f64",
        }
    }

    /// The elements as integers, if they are integers (of any width and sign).
    fn to_i128s(&self) -> Option<Vec<i128>> {
        fn widen<T: Copy + Into<i128>>(v: &[T]) -> Vec<i128> {
            v.iter().map(|&x| x.into()).collect()
        }
        Some(match self {
            Array::U8(v) => widen(v),
            Array::I8(v) => widen(v),
            Array::U16(v) => widen(v),
            Array::I16(v) => widen(v),
            Array::U32(v) => widen(v),
            Array::I32(v) => widen(v),
            Array::U64(v) => widen(v),
            Array::I64(v) => widen(v),
            _ => return None,
        })
    }
}

/// The metadata of a file, in file order; keys are unique.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    entries: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

impl Metadata {
    /// Metadata from key/value pairs (e.g. built by hand in a test); a repeated key is refused.
    pub fn from_entries(entries: Vec<(String, Value)>) -> Result<Self> {
        Self::build(entries).map_err(|key| Error::DuplicateKey { key })
    }

    /// Metadata from key/value pairs, or the first repeated key.
    pub(crate) fn build(entries: Vec<(String, Value)>) -> Result<Self, String> {
        let mut index = HashMap::with_capacity(entries.len());
        for (i, (key, _)) in entries.iter().enumerate() {
            if index.insert(key.clone(), i).is_some() {
                return Err(key.clone());
            }
        }
        Ok(Self { entries, index })
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The key/value pairs in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The value of `key`, of any type.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index
            .get(key)
            .and_then(|&i| self.entries.get(i))
            .map(|(_, v)| v)
    }

    /// `general.architecture` (e.g. `llama`, `qwen2`), which every GGUF model file has.
    pub fn architecture(&self) -> Result<&str> {
        self.require_str("general.architecture")
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(wrong_type(key, "string", other)),
        }
    }

    /// A boolean value.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(wrong_type(key, "bool", other)),
        }
    }

    /// A non-negative integer value (of any integer type).
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get_integer(key, "a non-negative integer")
    }

    /// An integer value that fits in `u32` (token ids, counts).
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>> {
        self.get_integer(key, "an integer in u32 range")
    }

    /// A float value: `f32`, or `f64` rounded to the nearest `f32`.
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(*v)),
            Some(Value::F64(v)) => Ok(Some(*v as f32)),
            Some(other) => Err(wrong_type(key, "f32", other)),
        }
    }

    /// An array of strings (`tokenizer.ggml.tokens`, `tokenizer.ggml.merges`).
    pub fn get_str_array(&self, key: &str) -> Result<Option<&[String]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(Array::String(v))) => Ok(Some(v)),
            Some(other) => Err(wrong_type(key, "array of string", other)),
        }
    }

    /// An array of integers that fit in `i32` (`tokenizer.ggml.token_type`).
    pub fn get_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let ints = match value {
            Value::Array(Array::I32(v)) => return Ok(Some(v.clone())),
            Value::Array(a) => a.to_i128s(),
            _ => None,
        }
        .ok_or_else(|| wrong_type(key, "array of i32", value))?;
        let out = ints
            .into_iter()
            .map(|x| i32::try_from(x).map_err(|_| out_of_range(key, x, "integers in i32 range")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(out))
    }

    /// An array of floats, `f32` (`tokenizer.ggml.scores`) or `f64` rounded to `f32`.
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(Array::F32(v))) => Ok(Some(v.clone())),
            Some(Value::Array(Array::F64(v))) => Ok(Some(v.iter().map(|&x| x as f32).collect())),
            Some(other) => Err(wrong_type(key, "array of f32", other)),
        }
    }

    /// A string value that must be present.
    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get_str(key)?.ok_or_else(|| missing(key))
    }

    /// A non-negative integer value that must be present.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key)?.ok_or_else(|| missing(key))
    }

    /// An array of strings that must be present.
    pub fn require_str_array(&self, key: &str) -> Result<&[String]> {
        self.get_str_array(key)?.ok_or_else(|| missing(key))
    }

    /// An integer value converted to `T`, refusing values out of its range.
    fn get_integer<T: TryFrom<i128>>(
        &self,
        key: &str,
        expected: &'static str,
    ) -> Result<Option<T>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let x = value
            .as_i128()
            .ok_or_else(|| wrong_type(key, "integer", value))?;
        T::try_from(x)
            .map(Some)
            .map_err(|_| out_of_range(key, x, expected))
    }
}

fn missing(key: &str) -> Error {
    Error::MissingKey {
        key: key.to_owned(),
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &Value) -> Error {
    Error::KeyType {
        key: key.to_owned(),
        expected,
        found: found.type_name(),
    }
}

fn out_of_range(key: &str, value: i128, expected: &'static str) -> Error {
    Error::KeyRange {
        key: key.to_owned(),
        value,
        expected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata() -> Metadata {
        Metadata::from_entries(vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("llama.block_count".into(), Value::U32(2)),
            ("neg".into(), Value::I32(-1)),
            ("big".into(), Value::U64(u64::MAX)),
            ("eps".into(), Value::F32(1e-5)),
            (
                "tokens".into(),
                Value::Array(Array::String(vec!["a".into(), "b".into()])),
            ),
            ("types".into(), Value::Array(Array::U8(vec![1, 2]))),
            ("wide".into(), Value::Array(Array::I64(vec![1, 1 << 40]))),
        ])
        .expect("unique keys")
    }

    #[test]
    fn typed_accessors_convert_what_fits() -> Result<()> {
        let m = metadata();
        assert_eq!(m.architecture()?, "llama");
        assert_eq!(m.get_u64("llama.block_count")?, Some(2));
        assert_eq!(m.get_u32("llama.block_count")?, Some(2));
        assert_eq!(m.get_u64("big")?, Some(u64::MAX));
        assert_eq!(m.get_f32("eps")?, Some(1e-5));
        assert_eq!(
            m.get_str_array("tokens")?,
            Some(&["a".into(), "b".into()][..])
        );
        assert_eq!(m.get_i32_array("types")?, Some(vec![1, 2]));
        assert_eq!(m.get_u64("absent")?, None);
        assert_eq!(m.len(), 8);
        Ok(())
    }

    #[test]
    fn wrong_types_and_ranges_are_refused_by_key() {
        let m = metadata();
        let err = m
            .get_str("llama.block_count")
            .expect_err("u32 is no string");
        assert_eq!(
            err.to_string(),
            "metadata llama.block_count: expected string, found u32"
        );
        let err = m.get_u64("neg").expect_err("negative");
        assert_eq!(
            err.to_string(),
            "metadata neg: value -1 is out of range (expected a non-negative integer)"
        );
        assert!(m.get_u32("big").is_err());
        assert!(m.get_i32_array("wide").is_err());
        let err = m.get_f32_array("tokens").expect_err("strings");
        assert_eq!(
            err.to_string(),
            "metadata tokens: expected array of f32, found array of string"
        );
        let err = m.require_str("tokenizer.ggml.model").expect_err("absent");
        assert_eq!(err.to_string(), "metadata tokenizer.ggml.model: missing");
    }

    #[test]
    fn a_repeated_key_is_refused() {
        let err =
            Metadata::from_entries(vec![("k".into(), Value::U8(1)), ("k".into(), Value::U8(2))])
                .expect_err("duplicate");
        assert_eq!(err.to_string(), "metadata k: key appears twice");
    }
}
