//! Decompression of compressed clusters: raw deflate (QEMU's zlib type, window
//! bits -12) and zstd (compression type 1).

use super::format::{FormatError, COMPRESSION_ZSTD};
use std::io::Read;

/// Decompresses `src` into exactly `out.len()` bytes (one cluster).
pub(crate) fn decompress(kind: u8, src: &[u8], out: &mut [u8]) -> Result<(), FormatError> {
    let bad = |m: String| FormatError::Corrupt(format!("compressed cluster: {m}"));
    if kind == COMPRESSION_ZSTD {
        // QEMU writes one frame; trailing bytes up to the sector end are padding.
        let mut dec =
            ruzstd::decoding::StreamingDecoder::new(src).map_err(|e| bad(e.to_string()))?;
        let mut filled = 0;
        while filled < out.len() {
            match dec.read(&mut out[filled..]) {
                Ok(0) => {
                    return Err(bad(format!(
                        "zstd stream ended after {filled} of {} bytes",
                        out.len()
                    )))
                }
                Ok(n) => filled += n,
                Err(e) => return Err(bad(e.to_string())),
            }
        }
        return Ok(());
    }
    let mut d = flate2::Decompress::new(false);
    match d.decompress(src, out, flate2::FlushDecompress::Finish) {
        Ok(_) => {}
        Err(e) => return Err(bad(e.to_string())),
    }
    if d.total_out() as usize != out.len() {
        return Err(bad(format!(
            "deflate stream gave {} of {} bytes",
            d.total_out(),
            out.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    #[test]
    fn raw_deflate_roundtrip_and_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut c = Compress::new(Compression::default(), false);
        let mut z = vec![0u8; 70000];
        c.compress(&data, &mut z, FlushCompress::Finish).unwrap();
        z.truncate(c.total_out() as usize);
        z.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; 65536];
        decompress(0, &z, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(0, &[1, 2, 3], &mut out).is_err());
        assert!(decompress(1, &[1, 2, 3], &mut out).is_err());
        assert!(decompress(0, &z[..100], &mut out).is_err());
    }
}
