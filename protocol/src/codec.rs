//! Postcard encoding with the two rules every decoder here follows: the input is
//! capped before any parsing (DL-1, FUZZ-2) and every byte must be consumed
//! (SIG-5: trailing bytes are an error, not something to ignore).

use serde::{Serialize, de::DeserializeOwned};

/// Why bytes could not be turned into a value (or back).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("{what} is {len} bytes; the limit is {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} is malformed: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("{what} has {extra} trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("{what} could not be encoded: {reason}")]
    Encode { what: &'static str, reason: String },
}

/// Encodes `value` with postcard.
pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, CodecError> {
    postcard::to_allocvec(value).map_err(|e| CodecError::Encode {
        what,
        reason: e.to_string(),
    })
}

/// Fails when `bytes` is longer than `max`.
pub fn check_len(what: &'static str, bytes: &[u8], max: usize) -> Result<(), CodecError> {
    if bytes.len() > max {
        return Err(CodecError::TooLarge {
            what,
            len: bytes.len(),
            max,
        });
    }
    Ok(())
}

/// Decodes exactly one `T` from `bytes`, which must be at most `max` long, hold
/// nothing after the value, and be the value's one canonical encoding (postcard
/// itself accepts overlong varints; found by fuzzing). So every value has exactly
/// one byte form, and digests of bytes name values.
pub fn decode_exact<T: Serialize + DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    max: usize,
) -> Result<T, CodecError> {
    check_len(what, bytes, max)?;
    let (value, rest) = postcard::take_from_bytes::<T>(bytes).map_err(|e| malformed(what, e))?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes {
            what,
            extra: rest.len(),
        });
    }
    check_canonical(what, &value, bytes)?;
    Ok(value)
}

/// Fails unless `bytes` is exactly how `value` encodes.
pub fn check_canonical<T: Serialize>(
    what: &'static str,
    value: &T,
    bytes: &[u8],
) -> Result<(), CodecError> {
    if encode(what, value)? != bytes {
        return Err(CodecError::Malformed {
            what,
            reason: "non-canonical encoding (overlong varint)".into(),
        });
    }
    Ok(())
}

pub(crate) fn malformed(what: &'static str, e: postcard::Error) -> CodecError {
    CodecError::Malformed {
        what,
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_rejects_trailing_bytes() {
        let mut b = encode("u32", &7u32).unwrap();
        b.push(0);
        assert_eq!(
            decode_exact::<u32>("u32", &b, 16),
            Err(CodecError::TrailingBytes {
                what: "u32",
                extra: 1
            })
        );
    }

    // Regression from the `payloads` fuzz target: 0xff 0x00 is an overlong varint
    // for 127, which postcard alone accepts.
    #[test]
    fn codec_rejects_overlong_varints() {
        assert_eq!(decode_exact::<u16>("u16", &[0x7f], 8), Ok(127));
        assert!(matches!(
            decode_exact::<u16>("u16", &[0xff, 0x00], 8),
            Err(CodecError::Malformed { .. })
        ));
        assert!(matches!(
            decode_exact::<u64>("u64", &[0x80, 0x80, 0x00], 8),
            Err(CodecError::Malformed { .. })
        ));
    }

    #[test]
    fn codec_caps_before_parsing() {
        let b = vec![0u8; 100];
        assert!(matches!(
            decode_exact::<Vec<u8>>("blob", &b, 99),
            Err(CodecError::TooLarge { len: 100, .. })
        ));
    }

    // FUZZ-2: a length prefix claiming 2^32 elements fails fast, without trying to
    // allocate them (serde caps the pre-allocation, postcard runs out of input).
    #[test]
    fn codec_huge_length_prefix_fails_fast() {
        // varint(2^32) = 0x80 0x80 0x80 0x80 0x10
        let b = [0x80, 0x80, 0x80, 0x80, 0x10, 1, 2, 3];
        assert!(decode_exact::<Vec<u64>>("list", &b, 1024).is_err());
        assert!(decode_exact::<Vec<u8>>("bytes", &b, 1024).is_err());
        assert!(decode_exact::<String>("text", &b, 1024).is_err());
        assert!(decode_exact::<Vec<String>>("strings", &b, 1024).is_err());
    }
}
