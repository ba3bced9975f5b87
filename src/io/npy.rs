//! `.npy` arrays (numpy's format, versions 1.0-3.0) of float32 or float64 in C order, read as
//! f64 with errors naming the file: directions exported from numpy, and the arrays inside an
//! `.npz` (a zip of `.npy` files, as Gemma Scope publishes its SAEs).
//!
//! Layout (numpy's format spec, versions 1.0-3.0): the magic `\x93NUMPY`, a major and a minor
//! version byte, the header length (u16 LE in 1.x, u32 LE in 2.x/3.x), then the header: a
//! Python dict literal `{'descr': '<f4', 'fortran_order': False, 'shape': (k, d), }` padded
//! with spaces and a newline. The data follows directly.

use anyhow::{anyhow, bail, Result};

const NPY_MAGIC: &[u8] = b"\x93NUMPY";
/// numpy writes headers of well under a kilobyte; anything larger is corrupt.
const NPY_MAX_HEADER: usize = 1 << 16;

/// The parsed header of a .npy file.
struct NpyHeader {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Parse the dict literal of a .npy header. Exactly the keys `descr` (a string),
/// `fortran_order` (True/False) and `shape` (a tuple of non-negative integers) are accepted.
fn parse_npy_header(text: &str) -> Result<NpyHeader> {
    let mut p = DictParser {
        s: text.as_bytes(),
        i: 0,
    };
    let mut descr = None;
    let mut fortran = None;
    let mut shape = None;
    p.ws();
    p.expect(b'{')?;
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.ws();
        p.expect(b':')?;
        p.ws();
        let dup = match key.as_str() {
            "descr" => descr.replace(p.string()?).is_some(),
            "fortran_order" => fortran.replace(p.boolean()?).is_some(),
            "shape" => shape.replace(p.tuple()?).is_some(),
            other => bail!("unexpected key '{other}'"),
        };
        if dup {
            bail!("key '{key}' appears twice");
        }
        p.ws();
        if p.eat(b'}') {
            break;
        }
        p.expect(b',')?;
    }
    p.ws();
    if p.i != p.s.len() {
        bail!("unexpected text after the header dict at byte {}", p.i);
    }
    Ok(NpyHeader {
        descr: descr.ok_or_else(|| anyhow!("key 'descr' is missing"))?,
        fortran_order: fortran.ok_or_else(|| anyhow!("key 'fortran_order' is missing"))?,
        shape: shape.ok_or_else(|| anyhow!("key 'shape' is missing"))?,
    })
}

/// A cursor over the header text, just enough of Python literal syntax for numpy's headers.
struct DictParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl DictParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\t' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        if self.eat(c) {
            Ok(())
        } else {
            bail!("expected '{}' at byte {}", c as char, self.i)
        }
    }

    /// A single- or double-quoted string without escapes (numpy never writes any).
    fn string(&mut self) -> Result<String> {
        let q = match self.peek() {
            Some(c @ (b'\'' | b'"')) => c,
            _ => bail!("expected a quoted string at byte {}", self.i),
        };
        self.i += 1;
        let start = self.i;
        while let Some(c) = self.peek() {
            if c == q {
                let out = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                self.i += 1;
                return Ok(out);
            }
            if c == b'\\' {
                bail!("escape sequences in header strings are not supported");
            }
            self.i += 1;
        }
        bail!("unterminated string starting at byte {}", start - 1)
    }

    fn boolean(&mut self) -> Result<bool> {
        let rest = &self.s[self.i..];
        if rest.starts_with(b"True") {
            self.i += 4;
            Ok(true)
        } else if rest.starts_with(b"False") {
            self.i += 5;
            Ok(false)
        } else {
            bail!("expected True or False at byte {}", self.i)
        }
    }

    /// `(a, b, ...)` with an optional trailing comma; `()` is a 0-d shape.
    fn tuple(&mut self) -> Result<Vec<usize>> {
        self.expect(b'(')?;
        let mut out = Vec::new();
        loop {
            self.ws();
            if self.eat(b')') {
                return Ok(out);
            }
            if out.len() >= 32 {
                bail!("shape has more than 32 dimensions");
            }
            out.push(self.uint()?);
            self.ws();
            if self.eat(b')') {
                return Ok(out);
            }
            self.expect(b',')?;
        }
    }

    /// A non-negative decimal integer (Python 2 headers may carry an `L` suffix).
    fn uint(&mut self) -> Result<usize> {
        let start = self.i;
        let mut v: usize = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add((c - b'0') as usize))
                .ok_or_else(|| anyhow!("shape dimension at byte {start} overflows"))?;
            self.i += 1;
        }
        if self.i == start {
            bail!("expected a non-negative integer at byte {start}");
        }
        self.eat(b'L');
        Ok(v)
    }
}

/// A parsed array: its shape and its values in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// Parse the bytes of a `.npy` file (`file` names it in errors): little-endian float32 or
/// float64, C order (or Fortran order when at most one dimension exceeds 1, which is the same
/// layout), with a number of dimensions in `dims` (checked before the data).
pub fn parse(file: &str, bytes: &[u8], dims: std::ops::RangeInclusive<usize>) -> Result<Array> {
    if bytes.len() < NPY_MAGIC.len() + 2 || &bytes[..NPY_MAGIC.len()] != NPY_MAGIC {
        bail!("{file}: not a .npy file (the magic bytes \\x93NUMPY are missing)");
    }
    let major = bytes[6];
    let minor = bytes[7];
    let (hlen, hstart) = match major {
        1 => {
            let b = bytes
                .get(8..10)
                .ok_or_else(|| anyhow!("{file}: .npy header length is truncated"))?;
            (u16::from_le_bytes([b[0], b[1]]) as usize, 10)
        }
        2 | 3 => {
            let b = bytes
                .get(8..12)
                .ok_or_else(|| anyhow!("{file}: .npy header length is truncated"))?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
        }
        _ => bail!("{file}: .npy format version {major}.{minor} is not supported (1.x-3.x)"),
    };
    if hlen > NPY_MAX_HEADER {
        bail!("{file}: .npy header claims {hlen} bytes (limit {NPY_MAX_HEADER}); file is corrupt");
    }
    let hend = hstart + hlen;
    let header_bytes = bytes.get(hstart..hend).ok_or_else(|| {
        anyhow!(
            "{file}: .npy header claims {hlen} bytes but the file has only {} after the preamble",
            bytes.len() - hstart
        )
    })?;
    let header_text = std::str::from_utf8(header_bytes)
        .map_err(|_| anyhow!("{file}: .npy header is not valid text"))?;
    let header =
        parse_npy_header(header_text).map_err(|e| anyhow!("{file}: bad .npy header: {e}"))?;
    let itemsize = match header.descr.as_str() {
        "<f4" => 4,
        "<f8" => 8,
        ">f4" | ">f8" => bail!(
            "{file}: .npy data is big-endian ('{}'); save it little-endian (e.g. \
             arr.astype('<f4'))",
            header.descr
        ),
        d => bail!(
            "{file}: .npy dtype '{d}' is not supported; use float32 ('<f4') or float64 ('<f8')"
        ),
    };
    let shape = header.shape;
    if !dims.contains(&shape.len()) {
        bail!(
            "{file}: shape {shape:?} has {} dimensions; expected {} to {}",
            shape.len(),
            dims.start(),
            dims.end()
        );
    }
    if header.fortran_order && shape.iter().filter(|&&n| n > 1).count() > 1 {
        bail!(
            "{file}: shape {shape:?} stored in Fortran (column-major) order; save it in C order \
             (e.g. np.ascontiguousarray(arr))"
        );
    }
    // Check the element count against the bytes actually present before allocating anything.
    let data = &bytes[hend..];
    let want = shape
        .iter()
        .try_fold(itemsize, |n: usize, &d| n.checked_mul(d))
        .ok_or_else(|| anyhow!("{file}: shape {shape:?} overflows; header is corrupt"))?;
    if data.len() != want {
        bail!(
            "{file}: shape {shape:?} of '{}' needs {want} data bytes but the file has {}",
            header.descr,
            data.len()
        );
    }
    let data = if itemsize == 4 {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64)
            .collect()
    } else {
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    };
    Ok(Array { shape, data })
}

/// Every array of an `.npz` file (numpy's `savez` / `savez_compressed`: a zip whose members are
/// `NAME.npy`) as f32 tensors keyed by `NAME`, with errors naming the file and the member.
pub fn read_npz(path: &std::path::Path) -> Result<super::NamedTensors> {
    use std::io::Read;
    let file = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|e| anyhow!("reading {file}: {e}"))?;
    let mut zip =
        zip::ZipArchive::new(f).map_err(|e| anyhow!("{file}: not a valid .npz (zip) file: {e}"))?;
    let mut out = super::NamedTensors::new();
    for i in 0..zip.len() {
        let mut member = zip
            .by_index(i)
            .map_err(|e| anyhow!("{file}: member {i}: {e}"))?;
        let name = member
            .name()
            .map_err(|e| anyhow!("{file}: member {i} has an unreadable name: {e}"))?
            .to_string();
        let Some(key) = name.strip_suffix(".npy") else {
            bail!("{file}: member {name:?} is not a .npy array");
        };
        let mut bytes = Vec::with_capacity(member.size() as usize);
        member
            .read_to_end(&mut bytes)
            .map_err(|e| anyhow!("{file}: reading member {name}: {e}"))?;
        let a = parse(&format!("{file}:{name}"), &bytes, 0..=2)?;
        out.insert(
            key.to_string(),
            (a.shape, a.data.into_iter().map(|x| x as f32).collect()),
        );
    }
    Ok(out)
}
