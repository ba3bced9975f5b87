//! GGUF, llama.cpp's single-file model format (versions 2 and 3, little-endian).
//!
//! Layout:
//!
//! ```text
//! "GGUF"  u32 version  u64 tensor_count  u64 kv_count
//! kv_count x   (string key, u32 value_type, value)
//! tensor_count x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
//! padding to `general.alignment` (default 32)
//! tensor data; each tensor at data_start + offset (a multiple of the alignment)
//! ```
//!
//! Strings are a u64 byte length followed by UTF-8 bytes; arrays are a u32 element type, a u64
//! count and the elements (arrays may nest). `ne[0]` is the fastest-moving dimension, so the
//! row-major (Hugging Face) shape is `ne` reversed.
//!
//! The parser never trusts a count: every length is checked against the bytes left in the file
//! before anything is allocated for it, so a corrupt or truncated header is an error, not a panic
//! or a huge allocation. The file is memory-mapped; tensors are converted to f32 one at a time
//! (F32, F16, BF16, Q8_0, Q4_0, Q4_1).
//!
//! [`GgufWeights`] presents a llama-architecture file under Hugging Face tensor names, with
//! llama.cpp's q/k row permutation undone; [`config_from_gguf`] reads the hyper-parameters.

use crate::model::config::{Arch, MlpAct, ModelConfig};
use crate::model::weights::{HostTensor, WeightSource};
use anyhow::{anyhow, bail, ensure, Context, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"GGUF";
/// Tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are rejected (real files nest at most once); bounds the
/// parser's recursion on hostile input.
const MAX_ARRAY_DEPTH: usize = 8;

/// One metadata value. Arrays are stored typed (a `Vec<u8>` for a u8 array, not a vector of
/// enums) so an array costs about what it costs in the file.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(GgufArray),
}

/// A metadata array, typed by its element type.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
}

impl GgufValue {
    /// Any integer value that fits in a u64 (negative values do not).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any numeric value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "uint8",
            GgufValue::I8(_) => "int8",
            GgufValue::U16(_) => "uint16",
            GgufValue::I16(_) => "int16",
            GgufValue::U32(_) => "uint32",
            GgufValue::I32(_) => "int32",
            GgufValue::U64(_) => "uint64",
            GgufValue::I64(_) => "int64",
            GgufValue::F32(_) => "float32",
            GgufValue::F64(_) => "float64",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }
}

impl GgufArray {
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::F64(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            GgufArray::String(v) => Some(v),
            _ => None,
        }
    }

    /// An integer array as i64 values (`None` for non-integer arrays, or u64 values past i64).
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        fn conv<T: Copy>(v: &[T], f: impl Fn(T) -> Option<i64>) -> Option<Vec<i64>> {
            v.iter().map(|&x| f(x)).collect()
        }
        match self {
            GgufArray::U8(v) => conv(v, |x| Some(x as i64)),
            GgufArray::I8(v) => conv(v, |x| Some(x as i64)),
            GgufArray::U16(v) => conv(v, |x| Some(x as i64)),
            GgufArray::I16(v) => conv(v, |x| Some(x as i64)),
            GgufArray::U32(v) => conv(v, |x| Some(x as i64)),
            GgufArray::I32(v) => conv(v, |x| Some(x as i64)),
            GgufArray::U64(v) => conv(v, |x| i64::try_from(x).ok()),
            GgufArray::I64(v) => Some(v.clone()),
            _ => None,
        }
    }
}

/// A ggml tensor element type, by its numeric id in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: Self = Self(0);
    pub const F16: Self = Self(1);
    pub const Q4_0: Self = Self(2);
    pub const Q4_1: Self = Self(3);
    pub const Q8_0: Self = Self(8);
    pub const BF16: Self = Self(30);

    /// `(name, values per block, bytes per block)` for every type ggml defines. The sizes of
    /// types we cannot dequantise still let us check that a tensor's bytes lie inside the file.
    fn info(self) -> Option<(&'static str, u64, u64)> {
        Some(match self.0 {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 40),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            16 => ("IQ2_XXS", 256, 66),
            17 => ("IQ2_XS", 256, 74),
            18 => ("IQ3_XXS", 256, 98),
            19 => ("IQ1_S", 256, 50),
            20 => ("IQ4_NL", 32, 18),
            21 => ("IQ3_S", 256, 110),
            22 => ("IQ2_S", 256, 82),
            23 => ("IQ4_XS", 256, 136),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            29 => ("IQ1_M", 256, 56),
            30 => ("BF16", 1, 2),
            34 => ("TQ1_0", 256, 54),
            35 => ("TQ2_0", 256, 66),
            39 => ("MXFP4", 32, 17),
            _ => return None,
        })
    }

    /// The ggml name ("Q4_1", "Q6_K"), or "unknown type N".
    pub fn name(self) -> String {
        match self.info() {
            Some((name, _, _)) => name.to_string(),
            None => format!("unknown type {}", self.0),
        }
    }

    /// Values per block and bytes per block, when the type is known.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        self.info().map(|(_, b, s)| (b, s))
    }

    /// Whether [`dequantize`] handles this type.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            Self::F32 | Self::F16 | Self::BF16 | Self::Q8_0 | Self::Q4_0 | Self::Q4_1
        )
    }

    /// Bytes taken by `n_elements` values, when the type is known and `n_elements` is a whole
    /// number of blocks.
    pub fn byte_size(self, n_elements: u64) -> Option<u64> {
        let (block, size) = self.block_layout()?;
        if !n_elements.is_multiple_of(block) {
            return None;
        }
        (n_elements / block).checked_mul(size)
    }
}

/// One tensor's entry in the header.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `ne[0]` moves fastest.
    pub ne: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Bytes of data, when the type is known.
    pub n_bytes: Option<u64>,
}

impl GgufTensorInfo {
    /// The row-major (Hugging Face) shape: `ne` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }
}

/// The parsed header of a GGUF file: metadata, tensor directory and where the data starts.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, GgufValue)>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    /// Absolute byte offset of the data section.
    pub data_start: u64,
    meta_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

/// A bounds-checked little-endian reader over the header bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail!(
                "truncated: {what} needs {n} bytes at offset {} but only {} remain",
                self.pos,
                self.remaining()
            );
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let start = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| anyhow!("{what} at offset {start} is not valid UTF-8"))
    }

    /// Read `count` fixed-size elements, checking the byte extent before allocating.
    fn fixed<T, const N: usize>(
        &mut self,
        count: u64,
        what: &str,
        conv: fn([u8; N]) -> T,
    ) -> Result<Vec<T>> {
        let bytes = count
            .checked_mul(N as u64)
            .ok_or_else(|| anyhow!("{what}: array of {count} elements overflows"))?;
        let raw = self.take(bytes, what)?;
        Ok(raw
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                conv(a)
            })
            .collect())
    }
}

/// Smallest encoding of one value of GGUF value type `t` (strings: the length; arrays: type
/// and count), to bound element counts against the bytes that remain.
fn min_value_size(t: u32) -> Option<u64> {
    Some(match t {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}

fn parse_bool(b: u8, what: &str) -> Result<bool> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        other => bail!("{what}: bool byte is {other}, not 0 or 1"),
    }
}

fn read_value(r: &mut Reader, t: u32, what: &str, depth: usize) -> Result<GgufValue> {
    Ok(match t {
        0 => GgufValue::U8(r.array::<1>(what)?[0]),
        1 => GgufValue::I8(r.array::<1>(what)?[0] as i8),
        2 => GgufValue::U16(u16::from_le_bytes(r.array(what)?)),
        3 => GgufValue::I16(i16::from_le_bytes(r.array(what)?)),
        4 => GgufValue::U32(u32::from_le_bytes(r.array(what)?)),
        5 => GgufValue::I32(i32::from_le_bytes(r.array(what)?)),
        6 => GgufValue::F32(f32::from_le_bytes(r.array(what)?)),
        7 => GgufValue::Bool(parse_bool(r.array::<1>(what)?[0], what)?),
        8 => GgufValue::String(r.string(what)?),
        9 => GgufValue::Array(read_array(r, what, depth + 1)?),
        10 => GgufValue::U64(u64::from_le_bytes(r.array(what)?)),
        11 => GgufValue::I64(i64::from_le_bytes(r.array(what)?)),
        12 => GgufValue::F64(f64::from_le_bytes(r.array(what)?)),
        other => bail!("{what}: unknown value type {other}"),
    })
}

fn read_array(r: &mut Reader, what: &str, depth: usize) -> Result<GgufArray> {
    ensure!(
        depth <= MAX_ARRAY_DEPTH,
        "{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
    );
    let t = r.u32(what)?;
    let count = r.u64(what)?;
    let min = min_value_size(t).ok_or_else(|| anyhow!("{what}: unknown array element type {t}"))?;
    // Every element takes at least `min` bytes, so a count the file cannot hold is rejected
    // here, before any vector is sized from it.
    ensure!(
        count <= r.remaining() / min,
        "{what}: array claims {count} elements of type {t} but only {} bytes remain",
        r.remaining()
    );
    Ok(match t {
        0 => GgufArray::U8(r.fixed(count, what, |a: [u8; 1]| a[0])?),
        1 => GgufArray::I8(r.fixed(count, what, |a: [u8; 1]| a[0] as i8)?),
        2 => GgufArray::U16(r.fixed(count, what, u16::from_le_bytes)?),
        3 => GgufArray::I16(r.fixed(count, what, i16::from_le_bytes)?),
        4 => GgufArray::U32(r.fixed(count, what, u32::from_le_bytes)?),
        5 => GgufArray::I32(r.fixed(count, what, i32::from_le_bytes)?),
        6 => GgufArray::F32(r.fixed(count, what, f32::from_le_bytes)?),
        7 => {
            let raw = r.fixed(count, what, |a: [u8; 1]| a[0])?;
            GgufArray::Bool(
                raw.into_iter()
                    .map(|b| parse_bool(b, what))
                    .collect::<Result<_>>()?,
            )
        }
        8 => {
            let mut v = Vec::with_capacity(count as usize);
            for _ in 0..count {
                v.push(r.string(what)?);
            }
            GgufArray::String(v)
        }
        9 => {
            let mut v = Vec::with_capacity(count as usize);
            for _ in 0..count {
                v.push(read_array(r, what, depth + 1)?);
            }
            GgufArray::Array(v)
        }
        10 => GgufArray::U64(r.fixed(count, what, u64::from_le_bytes)?),
        11 => GgufArray::I64(r.fixed(count, what, i64::from_le_bytes)?),
        12 => GgufArray::F64(r.fixed(count, what, f64::from_le_bytes)?),
        _ => unreachable!("min_value_size accepted only known types"),
    })
}

impl GgufHeader {
    /// Parse and validate the header of a whole GGUF file held in `bytes`: every tensor must
    /// lie inside `bytes`. Errors say what was wrong and at which byte offset; callers add the
    /// file name.
    pub fn parse(bytes: &[u8]) -> Result<GgufHeader> {
        let mut r = Reader { buf: bytes, pos: 0 };
        let magic = r.array::<4>("magic")?;
        ensure!(
            &magic == MAGIC,
            "not a GGUF file: magic bytes are {magic:02x?}, expected \"GGUF\""
        );
        let version = r.u32("version")?;
        if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            bail!("big-endian GGUF files are not supported");
        }
        ensure!(
            version == 2 || version == 3,
            "GGUF version {version} is not supported (only 2 and 3)"
        );
        let tensor_count = r.u64("tensor count")?;
        let kv_count = r.u64("metadata count")?;
        // A key-value pair takes at least 13 bytes (8 key length + 4 type + 1 value), a tensor
        // entry at least 32 (8 name length + 4 n_dims + 8 one dimension + 4 type + 8 offset).
        ensure!(
            kv_count <= r.remaining() / 13,
            "header claims {kv_count} metadata entries but the file has only {} bytes left",
            r.remaining()
        );
        ensure!(
            tensor_count <= r.remaining() / 32,
            "header claims {tensor_count} tensors but the file has only {} bytes left",
            r.remaining()
        );

        let mut metadata = Vec::with_capacity(kv_count as usize);
        let mut meta_index = HashMap::with_capacity(kv_count as usize);
        for i in 0..kv_count {
            let key = r
                .string("metadata key")
                .with_context(|| format!("metadata entry {i}"))?;
            let what = format!("metadata {key:?}");
            let t = r.u32(&what)?;
            let value = read_value(&mut r, t, &what, 0)?;
            ensure!(
                meta_index.insert(key.clone(), metadata.len()).is_none(),
                "metadata key {key:?} appears twice"
            );
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let v = &metadata[i].1;
                let a = v.as_u64().ok_or_else(|| {
                    anyhow!(
                        "metadata \"general.alignment\" is a {}, not an integer",
                        v.type_name()
                    )
                })?;
                ensure!(
                    a.is_power_of_two() && a <= 1 << 20,
                    "metadata \"general.alignment\" = {a} is not a power of two up to 2^20"
                );
                a
            }
        };

        let mut tensors = Vec::with_capacity(tensor_count as usize);
        let mut tensor_index = HashMap::with_capacity(tensor_count as usize);
        for i in 0..tensor_count {
            let name = r
                .string("tensor name")
                .with_context(|| format!("tensor entry {i}"))?;
            let what = format!("tensor {name:?}");
            let n_dims = r.u32(&what)?;
            ensure!(
                (1..=MAX_DIMS).contains(&n_dims),
                "{what}: {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})"
            );
            let mut ne = Vec::with_capacity(n_dims as usize);
            let mut n_elements: u64 = 1;
            for _ in 0..n_dims {
                let d = r.u64(&what)?;
                n_elements = n_elements
                    .checked_mul(d)
                    .filter(|&n| n <= i64::MAX as u64)
                    .ok_or_else(|| anyhow!("{what}: element count overflows"))?;
                ne.push(d);
            }
            let ggml_type = GgmlType(r.u32(&what)?);
            let offset = r.u64(&what)?;
            ensure!(
                offset.is_multiple_of(alignment),
                "{what}: data offset {offset} is not a multiple of the alignment {alignment}"
            );
            let n_bytes = match ggml_type.block_layout() {
                None => None,
                Some((block, _)) => {
                    ensure!(
                        ne[0].is_multiple_of(block),
                        "{what}: first dimension {} is not a multiple of the {} block size {block}",
                        ne[0],
                        ggml_type.name()
                    );
                    ggml_type.byte_size(n_elements)
                }
            };
            ensure!(
                tensor_index.insert(name.clone(), tensors.len()).is_none(),
                "tensor {name:?} appears twice"
            );
            tensors.push(GgufTensorInfo {
                name,
                ne,
                ggml_type,
                offset,
                n_bytes,
            });
        }

        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;
        for t in &tensors {
            let end = t
                .n_bytes
                .and_then(|n| data_start.checked_add(t.offset)?.checked_add(n));
            match end {
                Some(end) if end <= file_len => {}
                Some(end) => bail!(
                    "tensor {:?} ({}, {} bytes at offset {}) ends at byte {end}, past the end of \
                     the file ({file_len} bytes): the file is truncated",
                    t.name,
                    t.ggml_type.name(),
                    t.n_bytes.unwrap_or(0),
                    data_start + t.offset
                ),
                None if t.n_bytes.is_some() => {
                    bail!("tensor {:?}: data extent overflows", t.name)
                }
                // Unknown type: its size is unknown; reading it is refused later by name.
                None => {}
            }
        }

        Ok(GgufHeader {
            version,
            metadata,
            tensors,
            alignment,
            data_start,
            meta_index,
            tensor_index,
        })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
}

/// The bytes of a GGUF file: memory-mapped, or owned (tests, in-memory files).
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An open GGUF file: its header and its (memory-mapped) bytes.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    pub header: GgufHeader,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.header.version)
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-map and parse `path`.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path)
            .with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        // SAFETY: the map is read-only and private to this process. Like every memory-mapped
        // model loader we rely on the file not being truncated or rewritten while it is open;
        // all offsets into it are validated against its length at parse time.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map GGUF file {}", path.display()))?;
        let header = GgufHeader::parse(&map)
            .with_context(|| format!("invalid GGUF file {}", path.display()))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            bytes: Bytes::Mapped(map),
            header,
        })
    }

    /// Parse a GGUF file held in memory; `origin` names it in messages.
    pub fn from_bytes(bytes: Vec<u8>, origin: impl Into<PathBuf>) -> Result<GgufFile> {
        let path = origin.into();
        let header = GgufHeader::parse(&bytes)
            .with_context(|| format!("invalid GGUF file {}", path.display()))?;
        Ok(GgufFile {
            path,
            bytes: Bytes::Owned(bytes),
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value by key.
    pub fn meta(&self, key: &str) -> Option<&GgufValue> {
        self.header.get(key)
    }

    /// A required metadata value; the error names the file and the key.
    pub fn meta_required(&self, key: &str) -> Result<&GgufValue> {
        self.meta(key)
            .ok_or_else(|| anyhow!("{}: metadata key {key:?} is missing", self.path.display()))
    }

    /// A required non-negative integer metadata value.
    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        let v = self.meta_required(key)?;
        v.as_u64().ok_or_else(|| {
            anyhow!(
                "{}: metadata {key:?} is a {}, expected a non-negative integer",
                self.path.display(),
                v.type_name()
            )
        })
    }

    /// An optional numeric metadata value.
    pub fn meta_f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                anyhow!(
                    "{}: metadata {key:?} is a {}, expected a number",
                    self.path.display(),
                    v.type_name()
                )
            }),
        }
    }

    /// An optional string metadata value.
    pub fn meta_str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                anyhow!(
                    "{}: metadata {key:?} is a {}, expected a string",
                    self.path.display(),
                    v.type_name()
                )
            }),
        }
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<&[u8]> {
        let n = info.n_bytes.ok_or_else(|| {
            anyhow!(
                "{}: tensor {:?} has type {}, which caft-fast cannot read",
                self.path.display(),
                info.name,
                info.ggml_type.name()
            )
        })?;
        // Parse time checked data_start + offset + n <= file length.
        let start = (self.header.data_start + info.offset) as usize;
        Ok(&self.bytes.as_slice()[start..start + n as usize])
    }

    /// A tensor by its GGUF name, converted to f32 with its row-major shape (no renaming,
    /// no permutation).
    pub fn tensor_f32(&self, name: &str) -> Result<HostTensor> {
        let info = self
            .header
            .tensor(name)
            .ok_or_else(|| anyhow!("{}: no tensor named {name:?}", self.path.display()))?;
        let ty = info.ggml_type;
        if !ty.is_supported() {
            bail!(
                "{}: tensor {name:?} has type {}; caft-fast reads F32, F16, BF16, Q8_0, Q4_0 and \
                 Q4_1 (re-quantise the model, e.g. to Q8_0, or use the safetensors original)",
                self.path.display(),
                ty.name()
            );
        }
        let bytes = self.tensor_bytes(info)?;
        let data = dequantize(ty, bytes, info.n_elements() as usize)
            .with_context(|| format!("{}: tensor {name:?} ({})", self.path.display(), ty.name()))?;
        Ok(HostTensor {
            shape: info.shape(),
            data,
        })
    }
}

/// Convert `n` values of type `ty` stored in `bytes` to f32.
///
/// Block formats (as in ggml), each block holding 32 consecutive values:
/// - Q8_0: f16 scale `d`, then 32 × i8 `q`; `x_i = d · q_i`.
/// - Q4_0: f16 `d`, then 16 bytes; byte `j` holds value `j` in its low nibble and value `j+16`
///   in its high nibble; `x = d · (nibble - 8)`.
/// - Q4_1: f16 `d`, f16 `m`, then 16 bytes as Q4_0; `x = d · nibble + m`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let expect = ty
        .byte_size(n as u64)
        .ok_or_else(|| anyhow!("{n} values are not a whole number of {} blocks", ty.name()))?;
    ensure!(
        bytes.len() as u64 == expect,
        "{n} values of {} take {expect} bytes, got {}",
        ty.name(),
        bytes.len()
    );
    let mut out = vec![0f32; n];
    // Conversion works block by block; large tensors (the embedding) go over all cores.
    const CHUNK: usize = 1 << 14;
    let (block, size) = ty
        .block_layout()
        .ok_or_else(|| anyhow!("type {} has no block layout", ty.name()))?;
    let (block, size) = (block as usize, size as usize);
    let per_chunk_blocks = CHUNK / block;
    let src_chunks = bytes.par_chunks(per_chunk_blocks * size);
    let dst_chunks = out.par_chunks_mut(per_chunk_blocks * block);
    match ty {
        GgmlType::F32 => src_chunks.zip(dst_chunks).for_each(|(s, d)| {
            for (o, c) in d.iter_mut().zip(s.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }),
        GgmlType::F16 => src_chunks.zip(dst_chunks).for_each(|(s, d)| {
            for (o, c) in d.iter_mut().zip(s.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }),
        GgmlType::BF16 => src_chunks.zip(dst_chunks).for_each(|(s, d)| {
            for (o, c) in d.iter_mut().zip(s.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }),
        GgmlType::Q8_0 => src_chunks.zip(dst_chunks).for_each(|(s, d)| {
            for (o, b) in d.chunks_exact_mut(32).zip(s.chunks_exact(34)) {
                let scale = f16::from_le_bytes([b[0], b[1]]).to_f32();
                for (x, &q) in o.iter_mut().zip(&b[2..34]) {
                    *x = scale * (q as i8) as f32;
                }
            }
        }),
        GgmlType::Q4_0 => src_chunks.zip(dst_chunks).for_each(|(s, d)| {
            for (o, b) in d.chunks_exact_mut(32).zip(s.chunks_exact(18)) {
                let scale = f16::from_le_bytes([b[0], b[1]]).to_f32();
                for (j, &q) in b[2..18].iter().enumerate() {
                    o[j] = scale * ((q & 0x0f) as i32 - 8) as f32;
                    o[j + 16] = scale * ((q >> 4) as i32 - 8) as f32;
                }
            }
        }),
        GgmlType::Q4_1 => src_chunks.zip(dst_chunks).for_each(|(s, d)| {
            for (o, b) in d.chunks_exact_mut(32).zip(s.chunks_exact(20)) {
                let scale = f16::from_le_bytes([b[0], b[1]]).to_f32();
                let min = f16::from_le_bytes([b[2], b[3]]).to_f32();
                for (j, &q) in b[4..20].iter().enumerate() {
                    o[j] = scale * (q & 0x0f) as f32 + min;
                    o[j + 16] = scale * (q >> 4) as f32 + min;
                }
            }
        }),
        other => bail!(
            "type {} cannot be converted (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)",
            other.name()
        ),
    }
    Ok(out)
}

/// The Hugging Face name of a llama-architecture GGUF tensor, or `None` for names we do not
/// know.
pub fn hf_name_for_gguf(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf = match base {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undo llama.cpp's rope permutation of q/k projection rows.
///
/// llama.cpp's converter stores `W' = W.reshape(H, 2, R/H/2, C).swapaxes(1, 2).reshape(R, C)`
/// (each head's rows interleaved so its rope rotates adjacent pairs). The inverse views `W'` as
/// `(H, R/H/2, 2, C)` and swaps axes 1 and 2: row `h·d + b·2 + a` of `W'` goes to row
/// `h·d + a·(d/2) + b` of `W`, with `d = R/H` the head dimension. Works for weights
/// `[R, C]` and biases `[R]` (C = 1).
pub fn unpermute_qk(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>> {
    ensure!(
        n_head > 0 && rows.is_multiple_of(2 * n_head),
        "cannot undo the q/k permutation: {rows} rows are not a multiple of 2 x {n_head} heads"
    );
    ensure!(data.len() == rows * cols, "q/k tensor size mismatch");
    let d = rows / n_head;
    let half = d / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for b in 0..half {
            for a in 0..2 {
                let src = h * d + b * 2 + a;
                let dst = h * d + a * half + b;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// How one Hugging Face name is served from the GGUF file.
#[derive(Clone, Debug)]
struct Mapped {
    gguf_name: String,
    /// Heads whose rope permutation to undo (q: n_head, k: n_head_kv).
    unpermute_heads: Option<usize>,
}

/// The tensors of a llama-architecture GGUF file under Hugging Face names.
pub struct GgufWeights {
    file: Arc<GgufFile>,
    map: BTreeMap<String, Mapped>,
}

impl GgufWeights {
    /// Name the tensors of `file` the Hugging Face way. `n_head` / `n_head_kv` are the query
    /// and key/value head counts, needed to undo the q/k permutation. Tensors with names we do
    /// not know keep their GGUF name (the model's loader rejects what it does not expect).
    pub fn new(file: Arc<GgufFile>, n_head: usize, n_head_kv: usize) -> Result<GgufWeights> {
        let mut map = BTreeMap::new();
        for t in &file.header.tensors {
            if t.name == "rope_freqs.weight" {
                bail!(
                    "{}: has rope_freqs (llama3 rope scaling stored as a tensor), which caft-fast \
                     does not read from GGUF; load the safetensors original instead",
                    file.path().display()
                );
            }
            let (hf, unpermute_heads) = match hf_name_for_gguf(&t.name) {
                Some(hf) => {
                    let heads = if hf.contains(".self_attn.q_proj.") {
                        Some(n_head)
                    } else if hf.contains(".self_attn.k_proj.") {
                        Some(n_head_kv)
                    } else {
                        None
                    };
                    (hf, heads)
                }
                None => (t.name.clone(), None),
            };
            let prev = map.insert(
                hf.clone(),
                Mapped {
                    gguf_name: t.name.clone(),
                    unpermute_heads,
                },
            );
            ensure!(
                prev.is_none(),
                "{}: two tensors map to {hf:?}",
                file.path().display()
            );
        }
        Ok(GgufWeights { file, map })
    }

    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }
}

impl WeightSource for GgufWeights {
    fn names(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let m = self.map.get(name)?;
        self.file.header.tensor(&m.gguf_name).map(|t| t.shape())
    }

    fn get(&self, name: &str) -> Result<HostTensor> {
        let m = self.map.get(name).ok_or_else(|| {
            anyhow!(
                "{}: no tensor {name:?} (GGUF names are mapped to Hugging Face names)",
                self.file.path().display()
            )
        })?;
        let mut t = self
            .file
            .tensor_f32(&m.gguf_name)
            .with_context(|| format!("loading {name:?}"))?;
        if let Some(heads) = m.unpermute_heads {
            let rows = t.shape[0];
            let cols = t.shape[1..].iter().product();
            t.data = unpermute_qk(&t.data, rows, cols, heads).with_context(|| {
                format!("{}: tensor {:?}", self.file.path().display(), m.gguf_name)
            })?;
        }
        Ok(t)
    }

    fn origin(&self) -> String {
        self.file.path().display().to_string()
    }
}

/// The model hyper-parameters stated by a llama-architecture GGUF file's metadata.
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    let path = file.path().display().to_string();
    let arch = file
        .meta_str_opt("general.architecture")?
        .ok_or_else(|| anyhow!("{path}: metadata key \"general.architecture\" is missing"))?;
    ensure!(
        arch == "llama",
        "{path}: general.architecture is {arch:?}; caft-fast reads GGUF files of the \"llama\" \
         architecture only (for Qwen2 or Mistral use the Hugging Face safetensors directory)"
    );
    let usize_key = |k: &str| -> Result<usize> {
        let v = file.meta_u64(k)?;
        ensure!(v > 0, "{path}: metadata {k:?} is 0");
        usize::try_from(v).map_err(|_| anyhow!("{path}: metadata {k:?} = {v} is too large"))
    };
    let hidden_size = usize_key("llama.embedding_length")?;
    let num_heads = usize_key("llama.attention.head_count")?;
    let num_kv_heads = match file.meta("llama.attention.head_count_kv") {
        Some(_) => usize_key("llama.attention.head_count_kv")?,
        None => num_heads,
    };
    let head_dim = match file.meta("llama.attention.key_length") {
        Some(_) => usize_key("llama.attention.key_length")?,
        None => {
            ensure!(
                hidden_size.is_multiple_of(num_heads),
                "{path}: embedding_length {hidden_size} is not a multiple of head_count {num_heads}"
            );
            hidden_size / num_heads
        }
    };
    let vocab_size = match file
        .meta("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
    {
        Some(tokens) => tokens.len(),
        None => usize_key("llama.vocab_size")?,
    };
    if let Some(kind) = file.meta_str_opt("llama.rope.scaling.type")? {
        ensure!(
            kind == "none",
            "{path}: llama.rope.scaling.type is {kind:?}; only unscaled rope is read from GGUF"
        );
    }
    let id = |k: &str| -> Result<Option<u32>> {
        match file.meta(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| anyhow!("{path}: metadata {k:?} is not a token id")),
        }
    };
    let bos_token_id = id("tokenizer.ggml.bos_token_id")?;
    let eos_token_ids = id("tokenizer.ggml.eos_token_id")?.into_iter().collect();
    Ok(ModelConfig {
        arch: Arch::Llama,
        vocab_size,
        hidden_size,
        intermediate_size: usize_key("llama.feed_forward_length")?,
        num_layers: usize_key("llama.block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rope_theta: file
            .meta_f64_opt("llama.rope.freq_base")?
            .unwrap_or(10000.0),
        rope_scaling: None,
        rms_norm_eps: file
            .meta_f64_opt("llama.attention.layer_norm_rms_epsilon")?
            .unwrap_or(1e-5),
        tie_word_embeddings: file.header.tensor("output.weight").is_none(),
        max_position_embeddings: match file.meta("llama.context_length") {
            Some(_) => usize_key("llama.context_length")?,
            None => 2048,
        },
        sliding_window: None,
        attention_bias: false,
        qk_norm: false,
        mlp_act: MlpAct::Silu,
        query_pre_attn_scalar: None,
        attn_softcap: None,
        final_softcap: None,
        gemma_norms: false,
        sliding_layers: None,
        bos_token_id,
        eos_token_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

    fn f16b(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    /// Q8_0: x = d · q exactly (d is an f16, q an i8), so the tolerance is zero.
    #[test]
    fn q8_0_known_values() {
        let mut rng = Rng::new(1);
        let mut bytes = Vec::new();
        let mut want = Vec::new();
        for _ in 0..3 {
            let d = f16::from_f32(rng.uniform(0.01, 0.2) as f32).to_f32();
            bytes.extend_from_slice(&f16b(d));
            for _ in 0..32 {
                let q = rng.below(256) as i32 - 128;
                bytes.push(q as i8 as u8);
                want.push(d * q as f32);
            }
        }
        let got = dequantize(GgmlType::Q8_0, &bytes, 96).unwrap();
        assert_eq!(got, want);
    }

    /// Q4_0 / Q4_1: low nibbles are values 0..15 of the block, high nibbles 16..31.
    #[test]
    fn q4_0_and_q4_1_nibble_order() {
        let mut rng = Rng::new(2);
        let nib: Vec<u8> = (0..32).map(|_| rng.below(16) as u8).collect();
        let packed: Vec<u8> = (0..16).map(|j| nib[j] | (nib[j + 16] << 4)).collect();
        let (d, m) = (0.5f32, -1.25f32); // exact in f16
        let mut q40 = f16b(d).to_vec();
        q40.extend_from_slice(&packed);
        let got = dequantize(GgmlType::Q4_0, &q40, 32).unwrap();
        let want: Vec<f32> = nib.iter().map(|&q| d * (q as f32 - 8.0)).collect();
        assert_eq!(got, want);

        let mut q41 = f16b(d).to_vec();
        q41.extend_from_slice(&f16b(m));
        q41.extend_from_slice(&packed);
        let got = dequantize(GgmlType::Q4_1, &q41, 32).unwrap();
        let want: Vec<f32> = nib.iter().map(|&q| d * q as f32 + m).collect();
        assert_eq!(got, want);
    }

    /// F16/BF16 widen exactly; F32 is copied.
    #[test]
    fn float_types() {
        let mut rng = Rng::new(3);
        let xs: Vec<f32> = rng.normal_vec(40);
        let f32b: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F32, &f32b, 40).unwrap(), xs);
        let h: Vec<u8> = xs.iter().flat_map(|&x| f16b(x)).collect();
        let want: Vec<f32> = xs.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        assert_eq!(dequantize(GgmlType::F16, &h, 40).unwrap(), want);
        let b: Vec<u8> = xs
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect();
        let want: Vec<f32> = xs.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        assert_eq!(dequantize(GgmlType::BF16, &b, 40).unwrap(), want);
    }

    /// Large inputs go through the parallel chunking; compare it with a block-by-block loop.
    #[test]
    fn chunked_conversion_matches_per_block() {
        let mut rng = Rng::new(4);
        let blocks = 1500; // more than one 16384-value chunk, not a whole number of chunks
        let bytes: Vec<u8> = (0..blocks * 20).map(|_| rng.below(256) as u8).collect();
        // Keep scales finite: overwrite d and m with small f16 values.
        let mut bytes = bytes;
        for b in bytes.chunks_exact_mut(20) {
            b[0..2].copy_from_slice(&f16b(rng.uniform(-1.0, 1.0) as f32));
            b[2..4].copy_from_slice(&f16b(rng.uniform(-1.0, 1.0) as f32));
        }
        let all = dequantize(GgmlType::Q4_1, &bytes, blocks * 32).unwrap();
        for (i, b) in bytes.chunks_exact(20).enumerate() {
            let one = dequantize(GgmlType::Q4_1, b, 32).unwrap();
            assert_eq!(&all[i * 32..(i + 1) * 32], &one[..]);
        }
    }

    #[test]
    fn unsupported_and_misaligned_inputs_are_errors() {
        let e = dequantize(GgmlType(14), &[0u8; 210], 256).unwrap_err();
        assert!(e.to_string().contains("Q6_K"), "{e}");
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 33], 32).is_err());
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 34], 31).is_err());
        assert!(dequantize(GgmlType(999), &[], 0).is_err());
    }

    /// The un-permutation inverts llama.cpp's permutation (written here the converter's way).
    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        let (n_head, d, cols) = (3, 8, 5);
        let rows = n_head * d;
        let mut rng = Rng::new(5);
        let w = rng.normal_vec(rows * cols);
        // W'[h, b, a] = W[h, a, b] with W viewed as (H, 2, d/2, C) and W' as (H, d/2, 2, C).
        let mut permuted = vec![0f32; w.len()];
        for h in 0..n_head {
            for a in 0..2 {
                for b in 0..d / 2 {
                    let src = h * d + a * (d / 2) + b;
                    let dst = h * d + b * 2 + a;
                    permuted[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_ne!(permuted, w);
        assert_eq!(unpermute_qk(&permuted, rows, cols, n_head).unwrap(), w);
        assert!(unpermute_qk(&permuted, rows, cols, 5).is_err());
    }

    #[test]
    fn gguf_names_map_to_hf() {
        assert_eq!(
            hf_name_for_gguf("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name_for_gguf("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_name_for_gguf("output.weight").as_deref(),
            Some("lm_head.weight")
        );
        assert_eq!(hf_name_for_gguf("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name_for_gguf("blk.1.attn_rot.weight"), None);
    }
}
