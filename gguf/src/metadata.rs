//! Metadata in file order with typed getters whose errors name the key.

use std::collections::HashMap;

use crate::error::{GgufError, Result};
use crate::value::{Array, Value, ValueType};

/// Key/value pairs in file order, indexed by key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metadata {
    entries: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

impl Metadata {
    /// Appends `key`, or replaces its value in place when it is already present (keeping its position).
    pub fn push(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        match self.index.get(&key) {
            Some(&i) => self.entries[i].1 = value,
            None => {
                self.index.insert(key.clone(), self.entries.len());
                self.entries.push((key, value));
            }
        }
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let i = self.index.remove(key)?;
        let (_, value) = self.entries.remove(i);
        for pos in self.index.values_mut() {
            if *pos > i {
                *pos -= 1;
            }
        }
        Some(value)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// Pairs in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value of `key`, or a `MissingKey` error.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_string(),
        })
    }

    /// A string value (strict: the key must hold a string).
    pub fn str(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            other => Err(GgufError::wrong_type(
                key,
                ValueType::String,
                other.value_type(),
            )),
        }
    }

    /// A u32 value (strict, as llama.cpp's getter is: the key must be stored as uint32).
    pub fn u32(&self, key: &str) -> Result<u32> {
        match self.require(key)? {
            Value::U32(v) => Ok(*v),
            other => Err(GgufError::wrong_type(
                key,
                ValueType::U32,
                other.value_type(),
            )),
        }
    }

    /// An f32 value (strict).
    pub fn f32(&self, key: &str) -> Result<f32> {
        match self.require(key)? {
            Value::F32(v) => Ok(*v),
            other => Err(GgufError::wrong_type(
                key,
                ValueType::F32,
                other.value_type(),
            )),
        }
    }

    /// A bool value (strict).
    pub fn bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            Value::Bool(v) => Ok(*v),
            other => Err(GgufError::wrong_type(
                key,
                ValueType::Bool,
                other.value_type(),
            )),
        }
    }

    /// An integer of any GGUF integer type that fits a u64 (lenient; for keys writers disagree on, like `split.count`).
    pub fn uint(&self, key: &str) -> Result<u64> {
        let value = self.require(key)?;
        let int = value
            .as_i128()
            .ok_or_else(|| GgufError::wrong_type(key, "an integer", value.value_type()))?;
        u64::try_from(int).map_err(|_| GgufError::BadValue {
            key: key.to_string(),
            expected: "a non-negative integer".into(),
            got: int.to_string(),
        })
    }

    /// An array value.
    pub fn array(&self, key: &str) -> Result<&Array> {
        match self.require(key)? {
            Value::Array(a) => Ok(a),
            other => Err(GgufError::wrong_type(
                key,
                ValueType::Array,
                other.value_type(),
            )),
        }
    }

    /// An array of integers (element type INT32 or UINT32, as llama.cpp accepts), as i64.
    pub fn int_array(&self, key: &str) -> Result<Vec<i64>> {
        match self.array(key)? {
            Array::I32(v) => Ok(v.iter().map(|&x| x.into()).collect()),
            Array::U32(v) => Ok(v.iter().map(|&x| x.into()).collect()),
            other => Err(
                GgufError::wrong_type(key, "array of int32 or uint32", other.elem_type())
                    .with_array_note(),
            ),
        }
    }

    /// An array of strings.
    pub fn str_array(&self, key: &str) -> Result<&[String]> {
        match self.array(key)? {
            Array::String(v) => Ok(v),
            other => Err(
                GgufError::wrong_type(key, "array of string", other.elem_type()).with_array_note(),
            ),
        }
    }
}

impl GgufError {
    /// Marks a `WrongType` error as being about an array's element type.
    fn with_array_note(self) -> GgufError {
        match self {
            GgufError::WrongType { key, expected, got } => GgufError::WrongType {
                key,
                expected,
                got: format!("array of {got}"),
            },
            other => other,
        }
    }
}
