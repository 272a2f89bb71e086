//! Encryption at rest for info-request answers (which may be secrets).
//!
//! Values are sealed with AES-256-GCM under the *active* key of a [`Keyring`],
//! with a fresh random 96-bit nonce per value. Each [`SealedValue`] records the
//! id of the key it was sealed with, so keys can be rotated: a new active key
//! is configured and the old ones are kept for opening existing values only.
//!
//! The associated data (`aad`) passed to [`Keyring::seal`] and
//! [`Keyring::open`] binds a ciphertext to its owner (for example the bytes of
//! an info request id), so a ciphertext copied to another row fails to open.
//!
//! Keys come from configuration (`ORCH_SECRET_KEY`), see
//! [`Keyring::from_config`] and [`SecretKey::parse`]. Key material is never
//! printed by `Debug` nor echoed in error messages.

use std::fmt;

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Length of a key in bytes (AES-256).
const KEY_LEN: usize = 32;
/// Length of a nonce in bytes (96 bits, the GCM standard size).
const NONCE_LEN: usize = 12;
/// Length of the GCM authentication tag appended to every ciphertext.
const TAG_LEN: usize = 16;
/// Maximum length of a key id.
const MAX_KEY_ID_LEN: usize = 64;
/// The id every key configured without one was given before ids were derived
/// from the key itself: values sealed under it stay readable (see
/// [`Keyring::from_key`]).
pub const LEGACY_KEY_ID: &str = "k1";
/// Hex characters of a key's fingerprint used as its id.
const FINGERPRINT_HEX_LEN: usize = 8;

/// What a key must look like; used in every key parsing error.
const KEY_FORMAT_HINT: &str = "expected 64 hex characters or the base64 encoding \
     (standard or URL-safe, padding optional) of exactly 32 bytes, optionally \
     prefixed with \"hex:\" or \"base64:\"";

/// Standard alphabet, accepting input with or without padding.
const B64_STANDARD_ANY_PAD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
/// URL-safe alphabet, accepting input with or without padding.
const B64_URL_SAFE_ANY_PAD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Errors of key parsing, sealing and opening.
///
/// Messages never contain key material nor the configuration text they were
/// parsed from.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CryptoError {
    /// A key (or the key configuration) could not be parsed; the message says
    /// what was expected.
    #[error("invalid secret key: {0}")]
    InvalidKey(String),
    /// A key id is not 1..=64 characters of `[A-Za-z0-9_.-]`, or is a duplicate.
    #[error("invalid key id: {0}")]
    InvalidKeyId(String),
    /// A sealed value names a key that is not in the keyring.
    #[error("unknown key id {0:?}: the key it was sealed with is not configured")]
    UnknownKeyId(String),
    /// Decryption failed: wrong key, tampered data or wrong associated data.
    #[error("decryption failed (wrong key, tampered data or wrong associated data)")]
    Decrypt,
    /// Encryption failed (for example no randomness available for the nonce).
    #[error("encryption failed")]
    Encrypt,
    /// A sealed value is structurally invalid (bad encoding, wrong nonce length, ...).
    #[error("malformed sealed value: {0}")]
    Malformed(String),
    /// A plain (unencrypted) value was given to a keyring: it carries no associated data binding it to its
    /// owner, so once a key is configured it is refused rather than trusted.
    #[error(
        "the stored value is not encrypted (\"plain:\") but a secret key is configured: unencrypted values are \
         refused because nothing binds them to their owner"
    )]
    Unencrypted,
}

/// A 256-bit AES key.
///
/// `Debug` prints `SecretKey(..)`, never the key bytes.
#[derive(Clone)]
pub struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    /// Parses a key: 64 hex characters, or the standard or URL-safe base64
    /// encoding (with or without padding) of exactly 32 bytes.
    ///
    /// An optional `"hex:"` or `"base64:"` prefix forces the encoding.
    /// Surrounding whitespace is ignored. The error says what was expected and
    /// never echoes the input.
    pub fn parse(s: &str) -> Result<SecretKey, CryptoError> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("hex:") {
            return parse_hex(rest.trim()).map(SecretKey).ok_or_else(|| invalid_key_error(rest.trim()));
        }
        if let Some(rest) = s.strip_prefix("base64:") {
            return parse_base64(rest.trim()).map(SecretKey).ok_or_else(|| invalid_key_error(rest.trim()));
        }
        parse_hex(s).or_else(|| parse_base64(s)).map(SecretKey).ok_or_else(|| invalid_key_error(s))
    }

    /// A new random key from the operating system's random number generator.
    pub fn generate() -> SecretKey {
        SecretKey(Aes256Gcm::generate_key(&mut OsRng).into())
    }

    /// The key as standard base64 with padding (44 characters), the format a
    /// generated key is written to a key file in; [`SecretKey::parse`] reads it back.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The key's fingerprint: the first 8 hex characters of the SHA-256 of its
    /// bytes. It is the id of a key configured without one, so servers that
    /// hold different keys seal under different ids. It reveals nothing usable
    /// about the key.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.0);
        hex::encode(&digest[..FINGERPRINT_HEX_LEN / 2])
    }

    /// The AES-256-GCM cipher for this key.
    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&self.0.into())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// Decodes exactly 64 hex characters (either case) into a key.
fn parse_hex(s: &str) -> Option<[u8; KEY_LEN]> {
    if s.len() != 2 * KEY_LEN || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; KEY_LEN];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Decodes standard or URL-safe base64 (padding optional) of exactly 32 bytes.
fn parse_base64(s: &str) -> Option<[u8; KEY_LEN]> {
    [B64_STANDARD_ANY_PAD, B64_URL_SAFE_ANY_PAD]
        .iter()
        .filter_map(|engine| engine.decode(s).ok())
        .find_map(|bytes| <[u8; KEY_LEN]>::try_from(bytes.as_slice()).ok())
}

/// The error for an unparsable key: what was expected and the input's length
/// in characters, never the input itself.
fn invalid_key_error(s: &str) -> CryptoError {
    if s.is_empty() {
        CryptoError::InvalidKey(format!("the key is empty; {KEY_FORMAT_HINT}"))
    } else {
        CryptoError::InvalidKey(format!("{KEY_FORMAT_HINT} (got {} characters)", s.chars().count()))
    }
}

/// Whether `id` is 1..=64 characters of `[A-Za-z0-9_.-]`.
fn is_valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_KEY_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Checks a key id; the error does not echo an invalid id (it might be a
/// misplaced piece of key material).
fn validate_key_id(id: &str) -> Result<(), CryptoError> {
    if is_valid_key_id(id) {
        Ok(())
    } else {
        Err(CryptoError::InvalidKeyId(format!(
            "a key id must be 1 to {MAX_KEY_ID_LEN} characters of A-Z, a-z, 0-9, '_', '.' \
             or '-' (got {} characters)",
            id.chars().count()
        )))
    }
}

/// An encrypted (or, when `key_id` is `None`, plain) value as stored by a backend.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedValue {
    /// Id of the key the value was sealed with; `None` for a plain value.
    pub key_id: Option<String>,
    /// The 96-bit nonce (12 bytes); empty for a plain value.
    pub nonce: Vec<u8>,
    /// The ciphertext followed by the 16-byte GCM tag; the bytes themselves
    /// for a plain value.
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for SealedValue {
    /// Never prints the stored bytes: a plain value is the answer itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedValue")
            .field("key_id", &self.key_id)
            .field("nonce_len", &self.nonce.len())
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

impl SealedValue {
    /// A value stored without encryption (only for non-secret answers when no
    /// key is configured): no key id, empty nonce, `ciphertext` = `bytes`.
    pub fn plain(bytes: &[u8]) -> SealedValue {
        SealedValue { key_id: None, nonce: Vec::new(), ciphertext: bytes.to_vec() }
    }

    /// Whether the value is encrypted (it has a key id).
    pub fn is_encrypted(&self) -> bool {
        self.key_id.is_some()
    }

    /// Compact single-string encoding for storage in one text column:
    /// `"v1:<key_id>:<base64 nonce>:<base64 ciphertext>"` for an encrypted
    /// value, `"plain:<base64>"` for a plain one (standard base64 with padding).
    ///
    /// Key ids must not contain `':'` (ids accepted by [`Keyring`] never do);
    /// a value with such an id, or a plain value with a non-empty nonce, does
    /// not survive [`SealedValue::decode`] unchanged.
    pub fn encode(&self) -> String {
        match &self.key_id {
            Some(key_id) => {
                format!("v1:{key_id}:{}:{}", STANDARD.encode(&self.nonce), STANDARD.encode(&self.ciphertext))
            }
            None => format!("plain:{}", STANDARD.encode(&self.ciphertext)),
        }
    }

    /// Parses the encoding produced by [`SealedValue::encode`]. Surrounding
    /// whitespace is ignored; anything else malformed (unknown prefix, wrong
    /// number of fields, invalid key id, bad base64, a nonce that is not 12
    /// bytes, a ciphertext shorter than the tag) is [`CryptoError::Malformed`].
    pub fn decode(s: &str) -> Result<SealedValue, CryptoError> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("plain:") {
            let bytes = STANDARD.decode(rest).map_err(|_| malformed("the plain value is not valid base64"))?;
            return Ok(SealedValue::plain(&bytes));
        }
        let Some(rest) = s.strip_prefix("v1:") else {
            return Err(malformed("expected \"v1:<key_id>:<nonce>:<ciphertext>\" or \"plain:<base64>\""));
        };
        let fields: Vec<&str> = rest.split(':').collect();
        let [key_id, nonce, ciphertext] = fields.as_slice() else {
            return Err(malformed("expected \"v1:<key_id>:<nonce>:<ciphertext>\" (4 ':'-separated fields)"));
        };
        if !is_valid_key_id(key_id) {
            return Err(malformed("invalid key id"));
        }
        let nonce = STANDARD.decode(nonce).map_err(|_| malformed("the nonce is not valid base64"))?;
        if nonce.len() != NONCE_LEN {
            return Err(malformed("the nonce must be 12 bytes"));
        }
        let ciphertext = STANDARD.decode(ciphertext).map_err(|_| malformed("the ciphertext is not valid base64"))?;
        if ciphertext.len() < TAG_LEN {
            return Err(malformed("the ciphertext is shorter than the 16-byte authentication tag"));
        }
        Ok(SealedValue { key_id: Some((*key_id).to_owned()), nonce, ciphertext })
    }
}

/// A [`CryptoError::Malformed`] with the given message.
fn malformed(msg: &str) -> CryptoError {
    CryptoError::Malformed(msg.to_owned())
}

/// One key of a keyring with its id.
#[derive(Clone)]
struct KeyEntry {
    id: String,
    /// [`SecretKey::fingerprint`]: values sealed under it open with this key whatever its id here.
    fingerprint: String,
    cipher: Aes256Gcm,
}

impl KeyEntry {
    fn new(id: &str, key: &SecretKey) -> KeyEntry {
        KeyEntry { id: id.to_owned(), fingerprint: key.fingerprint(), cipher: key.cipher() }
    }
}

/// The active key (used to seal) plus older keys (used only to open).
///
/// `Debug` prints the key ids only.
#[derive(Clone)]
pub struct Keyring {
    /// Never empty; the first entry is the active key.
    keys: Vec<KeyEntry>,
}

impl Keyring {
    /// A keyring whose active key is `key`, named `active_key_id`.
    ///
    /// Key ids are 1..=64 characters of `[A-Za-z0-9_.-]`.
    pub fn new(active_key_id: &str, key: SecretKey) -> Result<Keyring, CryptoError> {
        validate_key_id(active_key_id)?;
        Ok(Keyring { keys: vec![KeyEntry::new(active_key_id, &key)] })
    }

    /// A keyring for one key configured without an id: the active id is the
    /// key's [`SecretKey::fingerprint`], and the same key also opens values
    /// sealed under [`LEGACY_KEY_ID`] (`"k1"`, the id such a key had before).
    pub fn from_key(key: SecretKey) -> Keyring {
        Keyring { keys: vec![KeyEntry::new(&key.fingerprint(), &key), KeyEntry::new(LEGACY_KEY_ID, &key)] }
    }

    /// Adds an older key, used only to open values sealed under it. A
    /// duplicate id is an error.
    pub fn with_old_key(mut self, key_id: &str, key: SecretKey) -> Result<Keyring, CryptoError> {
        validate_key_id(key_id)?;
        if self.keys.iter().any(|entry| entry.id == key_id) {
            return Err(CryptoError::InvalidKeyId(format!("duplicate key id {key_id:?}")));
        }
        self.keys.push(KeyEntry::new(key_id, &key));
        Ok(self)
    }

    /// Parses key configuration (`ORCH_SECRET_KEY`): either a single key
    /// (its id is its fingerprint, and it also opens values sealed under
    /// `"k1"`: see [`Keyring::from_key`]), or a comma-separated list `"id:key,id:key"`
    /// whose FIRST entry is the active key and the others are old keys.
    ///
    /// Keys are in any format [`SecretKey::parse`] accepts, so a `"hex:"` or
    /// `"base64:"` prefix may follow `"id:"` (`"k2:hex:0011..."`). A single key
    /// may also carry just the prefix (`"hex:0011..."`); hence in a list an
    /// entry needs an id, and a key named `hex` or `base64` must be written
    /// with an explicit prefix (`"hex:base64:..."`). Whitespace around entries
    /// is ignored; empty entries and duplicate ids are errors. Errors never
    /// echo key material.
    pub fn from_config(s: &str) -> Result<Keyring, CryptoError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(CryptoError::InvalidKey(format!("no key configured; {KEY_FORMAT_HINT}")));
        }
        let entries: Vec<&str> = s.split(',').map(str::trim).collect();
        if let [single] = entries.as_slice() {
            if is_bare_key(single) {
                return Ok(Keyring::from_key(SecretKey::parse(single)?));
            }
        }
        let mut keyring: Option<Keyring> = None;
        for (index, entry) in entries.iter().enumerate() {
            let position = index + 1;
            if entry.is_empty() {
                return Err(CryptoError::InvalidKey(format!("entry {position} of the key list is empty")));
            }
            let id_and_key = if is_bare_key(entry) { None } else { entry.split_once(':') };
            let Some((id, key)) = id_and_key else {
                return Err(CryptoError::InvalidKey(format!(
                    "entry {position} of the key list has no key id; expected \"id:key,id:key\""
                )));
            };
            let id = id.trim();
            validate_key_id(id).map_err(|err| match err {
                CryptoError::InvalidKeyId(msg) => {
                    CryptoError::InvalidKeyId(format!("entry {position} of the key list: {msg}"))
                }
                other => other,
            })?;
            let key = SecretKey::parse(key).map_err(|err| match err {
                CryptoError::InvalidKey(msg) => CryptoError::InvalidKey(format!("key {id:?}: {msg}")),
                other => other,
            })?;
            keyring = Some(match keyring {
                None => Keyring::new(id, key)?,
                Some(ring) => ring.with_old_key(id, key)?,
            });
        }
        keyring.ok_or_else(|| CryptoError::InvalidKey("no key configured".to_owned()))
    }

    /// The id of the key new values are sealed with.
    pub fn active_key_id(&self) -> &str {
        self.keys.first().map_or("", |entry| entry.id.as_str())
    }

    /// Encrypts `plaintext` under the active key with a fresh random nonce,
    /// binding it to `aad` (which must be passed again to [`Keyring::open`]).
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<SealedValue, CryptoError> {
        let entry = self.keys.first().ok_or(CryptoError::Encrypt)?;
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.try_fill_bytes(&mut nonce).map_err(|_| CryptoError::Encrypt)?;
        let ciphertext = entry
            .cipher
            .encrypt(&Nonce::from(nonce), Payload { msg: plaintext, aad })
            .map_err(|_| CryptoError::Encrypt)?;
        Ok(SealedValue { key_id: Some(entry.id.clone()), nonce: nonce.to_vec(), ciphertext })
    }

    /// Opens an encrypted value with the key named by its `key_id` (an id of
    /// this keyring, or the fingerprint of one of its keys), checking
    /// `aad`. A plain value is refused ([`CryptoError::Unencrypted`]): it would
    /// open without its associated data, so anyone able to write a stored value
    /// could substitute one (a host that still has plain values from before a
    /// key was configured reads them without a keyring).
    ///
    /// Errors: [`CryptoError::Unencrypted`] for a plain value,
    /// [`CryptoError::UnknownKeyId`] if the key is not configured,
    /// [`CryptoError::Malformed`] if the nonce is not 12 bytes,
    /// [`CryptoError::Decrypt`] for a wrong key, tampered data or wrong `aad`.
    pub fn open(&self, sealed: &SealedValue, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let Some(key_id) = &sealed.key_id else {
            return Err(CryptoError::Unencrypted);
        };
        let entry = self.entry(key_id).ok_or_else(|| CryptoError::UnknownKeyId(key_id.clone()))?;
        let nonce = <[u8; NONCE_LEN]>::try_from(sealed.nonce.as_slice())
            .map_err(|_| malformed("the nonce must be 12 bytes"))?;
        entry
            .cipher
            .decrypt(&Nonce::from(nonce), Payload { msg: &sealed.ciphertext, aad })
            .map_err(|_| CryptoError::Decrypt)
    }

    /// The key with the given id.
    /// The key with the given id, else the key whose fingerprint it is (a value sealed while that key
    /// was configured alone, now listed under a chosen id).
    fn entry(&self, key_id: &str) -> Option<&KeyEntry> {
        self.keys
            .iter()
            .find(|entry| entry.id == key_id)
            .or_else(|| self.keys.iter().find(|entry| entry.fingerprint == key_id))
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|entry| entry.id.as_str()).collect();
        f.debug_struct("Keyring").field("active_key_id", &self.active_key_id()).field("key_ids", &ids).finish()
    }
}

/// Whether a configuration entry is a key without an id: no `':'` at all, or
/// just a `"hex:"` / `"base64:"` prefix before a key (keys contain no `':'`).
fn is_bare_key(entry: &str) -> bool {
    match entry.split_once(':') {
        None => true,
        Some((prefix, rest)) => matches!(prefix.trim(), "hex" | "base64") && !rest.contains(':'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn key_bytes() -> [u8; 32] {
        core::array::from_fn(|i| i as u8)
    }

    fn key(seed: u8) -> SecretKey {
        SecretKey([seed; 32])
    }

    fn ring() -> Keyring {
        Keyring::new("k1", key(1)).unwrap()
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn seal_open_roundtrip() {
        let ring = ring();
        for plaintext in [&b""[..], b"x", b"hunter2", &[0u8; 1000]] {
            let sealed = ring.seal(plaintext, b"req-1").unwrap();
            assert!(sealed.is_encrypted());
            assert_eq!(sealed.key_id.as_deref(), Some("k1"));
            assert_eq!(sealed.nonce.len(), NONCE_LEN);
            assert_eq!(sealed.ciphertext.len(), plaintext.len() + TAG_LEN);
            assert_eq!(ring.open(&sealed, b"req-1").unwrap(), plaintext);
        }
    }

    #[test]
    fn seals_differ_and_hide_plaintext() {
        let ring = ring();
        let plaintext = b"correct horse battery staple";
        let a = ring.seal(plaintext, b"aad").unwrap();
        let b = ring.seal(plaintext, b"aad").unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        for sealed in [&a, &b] {
            assert!(!contains(&sealed.ciphertext, plaintext));
            assert!(!contains(&sealed.ciphertext, b"horse"));
            assert!(!sealed.encode().contains("horse"));
        }
    }

    #[test]
    fn tampering_or_wrong_aad_fails_to_decrypt() {
        let ring = ring();
        let sealed = ring.seal(b"secret answer", b"req-1").unwrap();

        assert_eq!(ring.open(&sealed, b"req-2"), Err(CryptoError::Decrypt));
        assert_eq!(ring.open(&sealed, b""), Err(CryptoError::Decrypt));

        for i in 0..sealed.ciphertext.len() {
            let mut tampered = sealed.clone();
            tampered.ciphertext[i] ^= 0x01;
            assert_eq!(ring.open(&tampered, b"req-1"), Err(CryptoError::Decrypt));
        }
        for i in 0..sealed.nonce.len() {
            let mut tampered = sealed.clone();
            tampered.nonce[i] ^= 0x80;
            assert_eq!(ring.open(&tampered, b"req-1"), Err(CryptoError::Decrypt));
        }
        let mut truncated = sealed.clone();
        truncated.ciphertext.pop();
        assert_eq!(ring.open(&truncated, b"req-1"), Err(CryptoError::Decrypt));
        let mut empty = sealed.clone();
        empty.ciphertext.clear();
        assert_eq!(ring.open(&empty, b"req-1"), Err(CryptoError::Decrypt));
        let mut extended = sealed.clone();
        extended.ciphertext.push(0);
        assert_eq!(ring.open(&extended, b"req-1"), Err(CryptoError::Decrypt));

        let mut short_nonce = sealed.clone();
        short_nonce.nonce.pop();
        assert!(matches!(ring.open(&short_nonce, b"req-1"), Err(CryptoError::Malformed(_))));
    }

    #[test]
    fn wrong_key_with_same_id_fails_to_decrypt() {
        let sealed = ring().seal(b"secret", b"aad").unwrap();
        let other = Keyring::new("k1", key(2)).unwrap();
        assert_eq!(other.open(&sealed, b"aad"), Err(CryptoError::Decrypt));
    }

    #[test]
    fn swapped_key_id_fails_to_decrypt() {
        let ring = Keyring::new("k2", key(2)).unwrap().with_old_key("k1", key(1)).unwrap();
        let mut sealed = ring.seal(b"secret", b"aad").unwrap();
        sealed.key_id = Some("k1".to_owned());
        assert_eq!(ring.open(&sealed, b"aad"), Err(CryptoError::Decrypt));
    }

    #[test]
    fn rotation_keeps_old_values_readable() {
        let old = Keyring::new("2024", key(1)).unwrap();
        let old_value = old.seal(b"old secret", b"req-7").unwrap();

        let rotated = Keyring::new("2025", key(2)).unwrap().with_old_key("2024", key(1)).unwrap();
        assert_eq!(rotated.active_key_id(), "2025");
        assert_eq!(rotated.open(&old_value, b"req-7").unwrap(), b"old secret");

        let new_value = rotated.seal(b"new secret", b"req-8").unwrap();
        assert_eq!(new_value.key_id.as_deref(), Some("2025"));
        assert_eq!(rotated.open(&new_value, b"req-8").unwrap(), b"new secret");
        // The old keyring cannot read values sealed under the new key.
        assert_eq!(old.open(&new_value, b"req-8"), Err(CryptoError::UnknownKeyId("2025".to_owned())));
    }

    #[test]
    fn rotation_through_config() {
        let k1 = SecretKey::generate();
        let k2 = SecretKey::generate();
        let before = Keyring::from_config(&k1.to_base64()).unwrap();
        let value = before.seal(b"answer", b"id").unwrap();
        let after = Keyring::from_config(&format!("k2:{},k1:{}", k2.to_base64(), k1.to_base64())).unwrap();
        assert_eq!(after.active_key_id(), "k2");
        assert_eq!(after.open(&value, b"id").unwrap(), b"answer");
        assert_eq!(after.seal(b"x", b"id").unwrap().key_id.as_deref(), Some("k2"));
    }

    #[test]
    fn a_key_without_id_is_named_by_its_fingerprint_and_still_reads_k1() {
        use sha2::{Digest, Sha256};
        let a = SecretKey::generate();
        let b = SecretKey::generate();
        let expected = hex::encode(&Sha256::digest(a.0)[..4]);
        assert_eq!(a.fingerprint(), expected);
        assert_eq!(a.fingerprint().len(), 8);
        // Two servers with different generated keys seal under different ids.
        let ring_a = Keyring::from_config(&a.to_base64()).unwrap();
        let ring_b = Keyring::from_config(&b.to_base64()).unwrap();
        assert_eq!(ring_a.active_key_id(), expected);
        assert_ne!(ring_a.active_key_id(), ring_b.active_key_id());
        let sealed = ring_a.seal(b"answer", b"req").unwrap();
        assert_eq!(sealed.key_id.as_deref(), Some(expected.as_str()));
        assert_eq!(ring_b.open(&sealed, b"req"), Err(CryptoError::UnknownKeyId(expected.clone())));
        // Values sealed before, under "k1" with the same key, still open.
        let legacy = Keyring::new(LEGACY_KEY_ID, a.clone()).unwrap().seal(b"old", b"req").unwrap();
        assert_eq!(ring_a.open(&legacy, b"req").unwrap(), b"old");
        assert_eq!(ring_b.open(&legacy, b"req"), Err(CryptoError::Decrypt));
        // Listed later under a chosen id, the key still opens what it sealed under its fingerprint.
        let listed = Keyring::from_config(&format!("k2:{},old:{}", b.to_base64(), a.to_base64())).unwrap();
        assert_eq!(listed.open(&sealed, b"req").unwrap(), b"answer");
        assert!(!format!("{ring_a:?}").contains(&a.to_base64()));
    }

    #[test]
    fn unknown_key_id_is_reported() {
        let ring = ring();
        let mut sealed = ring.seal(b"secret", b"aad").unwrap();
        sealed.key_id = Some("gone".to_owned());
        assert_eq!(ring.open(&sealed, b"aad"), Err(CryptoError::UnknownKeyId("gone".to_owned())));
        assert!(CryptoError::UnknownKeyId("gone".to_owned()).to_string().contains("gone"));
    }

    #[test]
    fn plain_values_are_refused_with_a_keyring() {
        let ring = ring();
        let plain = SealedValue::plain(b"not secret");
        assert!(!plain.is_encrypted());
        assert!(plain.nonce.is_empty());
        assert_eq!(plain.ciphertext, b"not secret");
        // A plain value has no associated data: with a key configured it must not open for any owner.
        for aad in [&b"anything"[..], b"", b"req-1"] {
            assert_eq!(ring.open(&plain, aad), Err(CryptoError::Unencrypted));
        }
        let decoded = SealedValue::decode(&plain.encode()).unwrap();
        assert_eq!(ring.open(&decoded, b"req-1"), Err(CryptoError::Unencrypted));
        assert!(CryptoError::Unencrypted.to_string().contains("not encrypted"));

        let mut odd = plain.clone();
        odd.nonce = vec![0; 12];
        assert!(ring.open(&odd, b"").is_err());
    }

    #[test]
    fn parse_hex_keys() {
        let expected = key_bytes();
        assert_eq!(SecretKey::parse(HEX_KEY).unwrap().0, expected);
        assert_eq!(SecretKey::parse(&HEX_KEY.to_uppercase()).unwrap().0, expected);
        assert_eq!(SecretKey::parse(&format!("hex:{HEX_KEY}")).unwrap().0, expected);
        assert_eq!(SecretKey::parse(&format!("  \n{HEX_KEY}\t ")).unwrap().0, expected);
        assert_eq!(SecretKey::parse(&format!(" hex: {HEX_KEY} ")).unwrap().0, expected);
    }

    #[test]
    fn parse_base64_keys() {
        // Bytes chosen so the standard and URL-safe encodings differ.
        let bytes: [u8; 32] = core::array::from_fn(|i| 0xf8 | (i as u8 & 7));
        let std_pad = STANDARD.encode(bytes);
        let std_nopad = std_pad.trim_end_matches('=').to_owned();
        let url_pad = base64::engine::general_purpose::URL_SAFE.encode(bytes);
        let url_nopad = url_pad.trim_end_matches('=').to_owned();
        assert!(std_pad.ends_with('='));
        assert!(std_pad.contains('+') || std_pad.contains('/'));
        assert!(url_pad.contains('-') || url_pad.contains('_'));
        for s in [&std_pad, &std_nopad, &url_pad, &url_nopad] {
            assert_eq!(SecretKey::parse(s).unwrap().0, bytes, "{s}");
            assert_eq!(SecretKey::parse(&format!("base64:{s}")).unwrap().0, bytes, "{s}");
            assert_eq!(SecretKey::parse(&format!(" {s}\n")).unwrap().0, bytes, "{s}");
        }
    }

    #[test]
    fn to_base64_roundtrips_through_parse() {
        let k = SecretKey::generate();
        let encoded = k.to_base64();
        assert_eq!(encoded.len(), 44);
        assert!(encoded.ends_with('='));
        assert_eq!(SecretKey::parse(&encoded).unwrap().0, k.0);
        assert_ne!(SecretKey::generate().0, k.0);
        assert_eq!(SecretKey(key_bytes()).to_base64(), STANDARD.encode(key_bytes()));
    }

    #[test]
    fn parse_rejects_bad_keys_without_echoing_them() {
        let short_hex = "deadbeefcafebabe0123456789abcdef"; // 16 bytes
        let long_hex = format!("{HEX_KEY}aa");
        let short_b64 = STANDARD.encode(*b"sixteen-byte-key");
        let long_b64 = STANDARD.encode([7u8; 33]);
        let hex_as_b64 = format!("base64:{HEX_KEY}"); // decodes to 48 bytes
        let b64_as_hex = format!("hex:{}", STANDARD.encode(key_bytes()));
        let bad_hex = format!("{}zz", &HEX_KEY[..62]);
        let cases: Vec<String> = vec![
            String::new(),
            "   ".to_owned(),
            "hex:".to_owned(),
            "base64:".to_owned(),
            short_hex.to_owned(),
            long_hex,
            short_b64,
            long_b64,
            hex_as_b64,
            b64_as_hex,
            bad_hex,
            "this is definitely not a key!!!".to_owned(),
            "é".repeat(64),
            "secret-garbage-value:with:colons".to_owned(),
            "ab==cd".to_owned(),
        ];
        for input in &cases {
            let err = SecretKey::parse(input).unwrap_err();
            let CryptoError::InvalidKey(msg) = &err else {
                panic!("unexpected error {err:?}");
            };
            assert!(msg.contains("expected"), "{msg}");
            let trimmed = input.trim();
            let payload = trimmed.strip_prefix("hex:").or_else(|| trimmed.strip_prefix("base64:")).unwrap_or(trimmed);
            if payload.len() >= 8 {
                assert!(!msg.contains(payload), "{msg} echoes input");
                assert!(!err.to_string().contains(payload));
                assert!(!msg.contains(&payload[..8]), "{msg} echoes input");
            }
        }
    }

    #[test]
    fn key_ids_are_validated() {
        for id in ["k1", "2025-01", "a.b_c-D", &"x".repeat(64)] {
            assert!(Keyring::new(id, key(1)).is_ok(), "{id}");
        }
        for id in ["", "a:b", "a b", "a,b", "é", "k/1", &"x".repeat(65), "secretish\n"] {
            let err = Keyring::new(id, key(1)).unwrap_err();
            assert!(matches!(err, CryptoError::InvalidKeyId(_)), "{id:?}");
            assert!(matches!(ring().with_old_key(id, key(2)), Err(CryptoError::InvalidKeyId(_))));
        }
        let err = ring().with_old_key("k1", key(2)).unwrap_err();
        assert!(matches!(&err, CryptoError::InvalidKeyId(msg) if msg.contains("duplicate")));
        let ring = ring().with_old_key("k0", key(2)).unwrap();
        assert!(matches!(ring.with_old_key("k0", key(3)), Err(CryptoError::InvalidKeyId(_))));
    }

    #[test]
    fn from_config_single_key() {
        let b64 = STANDARD.encode(key_bytes());
        for config in
            [HEX_KEY.to_owned(), format!("hex:{HEX_KEY}"), b64.clone(), format!("base64:{b64}"), format!("  {b64}\n")]
        {
            let ring = Keyring::from_config(&config).unwrap();
            assert_eq!(ring.active_key_id(), SecretKey(key_bytes()).fingerprint());
            let sealed = ring.seal(b"v", b"a").unwrap();
            let direct = Keyring::from_key(SecretKey(key_bytes()));
            assert_eq!(direct.open(&sealed, b"a").unwrap(), b"v");
        }
    }

    #[test]
    fn from_config_lists() {
        let a = SecretKey::generate();
        let b = SecretKey::generate();
        let c = SecretKey::generate();
        let b_hex = hex::encode(b.0);
        let config = format!(" new:{} , mid:hex:{b_hex},old:base64:{}", a.to_base64(), c.to_base64());
        let ring = Keyring::from_config(&config).unwrap();
        assert_eq!(ring.active_key_id(), "new");
        for (id, k) in [("new", &a), ("mid", &b), ("old", &c)] {
            let sealed = Keyring::new(id, k.clone()).unwrap().seal(b"v", b"x").unwrap();
            assert_eq!(ring.open(&sealed, b"x").unwrap(), b"v");
        }

        // A single entry with an id.
        let single = Keyring::from_config(&format!("prod-1:{b_hex}")).unwrap();
        assert_eq!(single.active_key_id(), "prod-1");
        // Ids named like the prefixes need an explicit prefix.
        let named = Keyring::from_config(&format!("hex:hex:{b_hex}")).unwrap();
        assert_eq!(named.active_key_id(), "hex");
        let named = Keyring::from_config(&format!("base64:base64:{},k1:{b_hex}", a.to_base64())).unwrap();
        assert_eq!(named.active_key_id(), "base64");
    }

    #[test]
    fn from_config_rejects_bad_configs_without_echoing_keys() {
        let a = SecretKey::generate().to_base64();
        let b = SecretKey::generate().to_base64();
        let cases = [
            (String::new(), "InvalidKey"),
            ("  ".to_owned(), "InvalidKey"),
            (format!("k1:{a},"), "InvalidKey"),
            (format!("k1:{a},,k2:{b}"), "InvalidKey"),
            (format!("k1:{a},{b}"), "InvalidKey"),
            (format!("k1:{a},hex:{HEX_KEY}"), "InvalidKey"),
            (format!("k1:{a},k1:{b}"), "InvalidKeyId"),
            (format!("bad id:{a}"), "InvalidKeyId"),
            (format!(":{a}"), "InvalidKeyId"),
            (format!("k1:{a},k2:"), "InvalidKey"),
            (format!("k1:{a},k2:{}", &b[..20]), "InvalidKey"),
            (format!("k1:{a}:{b}"), "InvalidKey"),
            ("k1:not-a-key".to_owned(), "InvalidKey"),
        ];
        for (config, kind) in &cases {
            let err = Keyring::from_config(config).unwrap_err();
            let (actual, msg) = match &err {
                CryptoError::InvalidKey(m) => ("InvalidKey", m),
                CryptoError::InvalidKeyId(m) => ("InvalidKeyId", m),
                other => panic!("unexpected {other:?}"),
            };
            assert_eq!(actual, *kind, "{config}: {msg}");
            let text = err.to_string();
            for secret in [&a[..12], &b[..12], &HEX_KEY[..12]] {
                assert!(!text.contains(secret), "{text} echoes key material");
            }
        }
    }

    #[test]
    fn encode_decode_roundtrip() {
        let ring = Keyring::new("key_2025.01-a", key(9)).unwrap();
        for plaintext in [&b""[..], b"a", b"some longer answer with : and , in it"] {
            let sealed = ring.seal(plaintext, b"aad").unwrap();
            let encoded = sealed.encode();
            assert!(encoded.starts_with("v1:key_2025.01-a:"));
            assert_eq!(encoded.split(':').count(), 4);
            let decoded = SealedValue::decode(&encoded).unwrap();
            assert_eq!(decoded, sealed);
            assert_eq!(ring.open(&decoded, b"aad").unwrap(), plaintext);
        }
        for plaintext in [&b""[..], b"plain: value", &[0xff, 0, 1]] {
            let plain = SealedValue::plain(plaintext);
            let encoded = plain.encode();
            assert!(encoded.starts_with("plain:"));
            assert_eq!(SealedValue::decode(&encoded).unwrap(), plain);
        }
        assert_eq!(SealedValue::plain(b"").encode(), "plain:");
        assert_eq!(SealedValue::plain(b"hi").encode(), "plain:aGk=");
    }

    #[test]
    fn decode_rejects_malformed_strings() {
        let sealed = ring().seal(b"secret", b"aad").unwrap();
        let good = sealed.encode();
        let nonce = STANDARD.encode(&sealed.nonce);
        let ct = STANDARD.encode(&sealed.ciphertext);
        let cases = [
            String::new(),
            "v1".to_owned(),
            "v1:".to_owned(),
            "v2:k1:AAAA:AAAA".to_owned(),
            "plain".to_owned(),
            "plain:not base64!".to_owned(),
            "plain:aGk".to_owned(),
            format!("V1{}", &good[2..]),
            format!("v1:k1:{nonce}"),
            format!("{good}:extra"),
            format!("v1::{nonce}:{ct}"),
            format!("v1:bad id:{nonce}:{ct}"),
            format!("v1:{}:{nonce}:{ct}", "x".repeat(65)),
            format!("v1:k1:{nonce}x:{ct}"),
            format!("v1:k1:{}:{ct}", STANDARD.encode([0u8; 11])),
            format!("v1:k1:{}:{ct}", STANDARD.encode([0u8; 16])),
            format!("v1:k1::{ct}"),
            format!("v1:k1:{nonce}:"),
            format!("v1:k1:{nonce}:{}", STANDARD.encode([0u8; 15])),
            format!("v1:k1:{nonce}:{ct}%"),
            "v1:é:é:é".to_owned(),
            "::::".to_owned(),
        ];
        for case in &cases {
            assert!(
                matches!(SealedValue::decode(case), Err(CryptoError::Malformed(_))),
                "{case:?} -> {:?}",
                SealedValue::decode(case)
            );
        }
        assert_eq!(SealedValue::decode(&format!(" {good}\n")).unwrap(), sealed);
    }

    #[test]
    fn serde_roundtrip() {
        let sealed = ring().seal(b"secret", b"aad").unwrap();
        let json = serde_json::to_string(&sealed).unwrap();
        let back: SealedValue = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sealed);
        let plain = SealedValue::plain(b"x");
        let json = serde_json::to_value(&plain).unwrap();
        assert_eq!(json["key_id"], serde_json::Value::Null);
        assert_eq!(serde_json::from_value::<SealedValue>(json).unwrap(), plain);
    }

    #[test]
    fn debug_does_not_leak_key_bytes() {
        let k = SecretKey(key_bytes());
        assert_eq!(format!("{k:?}"), "SecretKey(..)");
        assert_eq!(format!("{k:#?}"), "SecretKey(..)");

        let ring = Keyring::new("active", k.clone()).unwrap().with_old_key("older", SecretKey([0xab; 32])).unwrap();
        for text in [format!("{ring:?}"), format!("{ring:#?}")] {
            assert!(text.contains("active"), "{text}");
            assert!(text.contains("older"), "{text}");
            assert!(!text.contains(&HEX_KEY[..16]), "{text}");
            assert!(!text.contains(&k.to_base64()[..16]), "{text}");
            assert!(!text.to_lowercase().contains("abab"), "{text}");
            assert!(!text.contains("171"), "{text}"); // 0xab as decimal
            assert!(!text.contains("[0, 1, 2"), "{text}");
        }
    }

    #[test]
    fn error_messages_are_descriptive() {
        assert!(CryptoError::Decrypt.to_string().contains("decryption failed"));
        assert_eq!(CryptoError::Encrypt.to_string(), "encryption failed");
        let err = SecretKey::parse("nope").unwrap_err();
        assert!(err.to_string().contains("64 hex characters"));
        assert!(err.to_string().contains("base64"));
    }
}
