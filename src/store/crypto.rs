//! Keys and sealing. A region's objects are encrypted with a repository key kept in the store,
//! wrapped (XChaCha20-Poly1305) by a key-encryption key from a local key file; losing the key
//! file loses the data, so it is generated 0600 with a warning to back it up.
//!
//! Blob ids are a keyed BLAKE3 hash of the plaintext (a key derived from the repository key):
//! equal clusters get equal ids inside one repository, and the ids say nothing about the
//! plaintext to anyone without the key. Each blob is sealed with a random 24-byte nonce and its
//! own id as associated data, so a blob moved to another id's place fails to open.
//!
//! A repository's cipher is fixed when it is created ([`Cipher`]; the version of its key
//! object says which): new repositories use AES-256-GCM with a subkey per message, older ones
//! keep XChaCha20-Poly1305, so every object of a repository is sealed the same way.

use std::borrow::Cow;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand::RngCore;

use super::error::{Result, StoreError};

pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
/// What sealing adds to a plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
const KEY_FILE_TAG: &str = "snapblk-key-v1";
pub const REPO_KEY_MAGIC: &[u8; 8] = b"SNAPBLKK";

/// How a repository seals blobs, pack indexes and manifests (store format version = the
/// version of its `keys/repository` object).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    /// Format 1: XChaCha20-Poly1305 under the data key.
    XChaCha20Poly1305,
    /// Format 2: AES-256-GCM under a key of its own for every message (keyed BLAKE3 of the
    /// message's random 24-byte nonce), with an all-zero GCM nonce. A subkey per message
    /// keeps GCM's 96-bit nonces out of the picture (random ones would limit a key to 2^32
    /// messages); with AES-NI it is about three times as fast as ChaCha20-Poly1305 here.
    Aes256GcmSubkey,
}

impl Cipher {
    pub const ALL: [Cipher; 2] = [Cipher::XChaCha20Poly1305, Cipher::Aes256GcmSubkey];

    /// What a new repository uses by default: AES-256-GCM where the CPU has AES and carry-less
    /// multiply instructions (without them ring's AES is constant-time software, several
    /// times slower than ChaCha20), else XChaCha20-Poly1305.
    pub fn for_this_cpu() -> Cipher {
        #[cfg(target_arch = "x86_64")]
        let hardware_aes =
            std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq");
        #[cfg(target_arch = "aarch64")]
        let hardware_aes =
            std::arch::is_aarch64_feature_detected!("aes") && std::arch::is_aarch64_feature_detected!("pmull");
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let hardware_aes = false;
        if hardware_aes {
            Cipher::Aes256GcmSubkey
        } else {
            Cipher::XChaCha20Poly1305
        }
    }

    /// Its store format version (that of the repository key object).
    pub fn version(self) -> u32 {
        match self {
            Cipher::XChaCha20Poly1305 => 1,
            Cipher::Aes256GcmSubkey => 2,
        }
    }

    fn from_version(v: u32) -> Option<Cipher> {
        Cipher::ALL.into_iter().find(|c| c.version() == v)
    }

    /// Its name in `snapblk.toml` (`cipher`) and in `region show`.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::XChaCha20Poly1305 => "xchacha20-poly1305",
            Cipher::Aes256GcmSubkey => "aes-256-gcm",
        }
    }

    pub fn from_name(name: &str) -> Option<Cipher> {
        Cipher::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The associated data of the repository key object: binds the version, so a key object
    /// relabelled to another cipher fails to open.
    fn key_object_aad(self) -> Vec<u8> {
        format!("snapblk repository key v{}", self.version()).into_bytes()
    }
}

/// A 32-byte blob id: keyed BLAKE3 of the plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 32]);

impl std::fmt::Debug for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", hex(&self.0[..8]))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The text of a new key file (what `snapblk key generate` prints).
pub fn new_key_file_text() -> String {
    let mut k = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut k);
    format!(
        "# snapblk key-encryption key. Anyone with this file can read the region's snapshots;\n# without it they are lost. Keep a copy somewhere safe.\n{KEY_FILE_TAG} {}\n",
        hex(&k)
    )
}

fn parse_key_file(text: &str, path: &Path) -> Result<[u8; 32]> {
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if let Some(k) = line.strip_prefix(KEY_FILE_TAG).map(str::trim).and_then(unhex::<32>) {
            return Ok(k);
        }
    }
    Err(StoreError::Config(format!(
        "{} is not a snapblk key file (expected a line '{KEY_FILE_TAG} <64 hex digits>'; make one with: snapblk key generate)",
        path.display()
    )))
}

/// Refuses a secret file (key file, S3 secret) that any user can read; warns when its group
/// can. A missing file is fine here (it is generated, or reported when read).
pub fn check_private(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::metadata(path) else { return Ok(()) };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(StoreError::Config(format!(
            "secret file {} can be read by any user (mode {mode:03o}); restrict it with: chmod 600 {}",
            path.display(),
            path.display()
        )));
    }
    if mode & 0o070 != 0 {
        tracing::warn!(file = %path.display(), mode = format!("{mode:03o}"), "secret file is readable by its group; chmod 600 it unless that is intended");
    }
    Ok(())
}

/// Checks a region's key file at start, before anything needs it: readable by no other user,
/// and a key file (a bad one is otherwise found by the first upload). One named in the config
/// must exist (a missing one would be generated, and open no existing repository); the
/// default one may be missing (generated on first use).
pub fn check_key_file(path: &Path, configured: bool, region: &str) -> Result<()> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            check_private(path)?;
            parse_key_file(&text, path).map(|_| ())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !configured => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::Config(format!(
            "the key_file {} of region '{region}' does not exist: restore it from its backup, or (for a new, empty region) create one with: snapblk key generate > {}",
            path.display(),
            path.display()
        ))),
        Err(e) => Err(StoreError::Config(format!("cannot read the key_file {} of region '{region}': {e}", path.display()))),
    }
}

/// Loads the key-encryption key, generating the file (0600) when it does not exist.
/// Returns whether it was generated, so the caller can warn that it must be backed up.
pub fn load_or_create_kek(path: &Path) -> Result<([u8; 32], bool)> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            check_private(path)?;
            Ok((parse_key_file(&text, path)?, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                crate::fsutil::create_dir_all_durable(parent)
                    .map_err(StoreError::io(format!("creating {}", parent.display())))?;
            }
            let text = new_key_file_text();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(StoreError::io(format!("creating key file {}", path.display())))?;
            // (the store's data is unreadable without it: its directory entry is synced too)
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_all())
                .and_then(|()| crate::fsutil::sync_parent(path))
                .map_err(StoreError::io(format!("writing key file {}", path.display())))?;
            Ok((parse_key_file(&text, path)?, true))
        }
        Err(e) => Err(StoreError::io(format!("reading key file {}", path.display()))(e)),
    }
}

fn cipher(key: &[u8; 32]) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(Key::from_slice(key))
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

/// Appends `nonce | ciphertext | tag` of `plain` to `out`.
fn seal_into(c: &XChaCha20Poly1305, aad: &[u8], plain: &[u8], out: &mut Vec<u8>) {
    let nonce = random_nonce();
    out.extend_from_slice(&nonce);
    let start = out.len();
    out.extend_from_slice(plain);
    // Encryption cannot fail for buffers far below XChaCha's 256 GiB message limit.
    let tag = c
        .encrypt_in_place_detached(XNonce::from_slice(&nonce), aad, &mut out[start..])
        .unwrap_or_else(|_| unreachable!("message within the AEAD limit"));
    out.extend_from_slice(&tag);
}

/// Opens `nonce | ciphertext | tag`; `None` when the tag does not verify.
fn open(c: &XChaCha20Poly1305, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < SEAL_OVERHEAD {
        return None;
    }
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
    let mut buf = ct.to_vec();
    c.decrypt_in_place_detached(XNonce::from_slice(nonce), aad, &mut buf, tag.into()).ok()?;
    Some(buf)
}

/// A blob's verified plaintext: a view into the buffer it was decrypted in (no copy).
#[derive(Debug)]
pub struct Plaintext {
    buf: Vec<u8>,
    range: std::ops::Range<usize>,
}

impl std::ops::Deref for Plaintext {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }
}

impl Plaintext {
    /// Plaintext verified by other means (read locally and matched against its blob id).
    pub fn from_vec(buf: Vec<u8>) -> Plaintext {
        let range = 0..buf.len();
        Plaintext { buf, range }
    }

    /// Seals this plaintext under `keys` as blob `id` (a copy to another repository). One its
    /// source stored uncompressed (lz4 did not shrink it, and would not now) is sealed where
    /// it lies: no copy, no second lz4 attempt.
    pub fn seal_as(self, keys: &RepoKeys, id: &BlobId) -> Vec<u8> {
        let len = self.range.len();
        if self.range.start == BLOB_PLAIN_AT && self.buf.len() >= sealed_room(len) {
            let mut buf = self.buf;
            let n = keys.seal_raw_in_place(id, &mut buf, len);
            buf.truncate(n);
            return buf;
        }
        let mut out = Vec::new();
        keys.seal_blob(id, &self, &mut out);
        out
    }

    /// As shared bytes, without copying.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from(self.buf).slice(self.range)
    }
}

/// The repository key object (`keys/repository`): the master key wrapped by the KEK, and the
/// repository's cipher (as the object's version).
pub fn wrap_master(kek: &[u8; 32], master: &[u8; 32], repo_cipher: Cipher) -> Vec<u8> {
    let mut out = REPO_KEY_MAGIC.to_vec();
    out.extend_from_slice(&repo_cipher.version().to_le_bytes());
    seal_into(&cipher(kek), &repo_cipher.key_object_aad(), master, &mut out);
    out
}

/// Opens the repository key object: the master key and the repository's cipher.
pub fn unwrap_master(kek: &[u8; 32], bytes: &[u8], region: &str, key_file: &Path) -> Result<([u8; 32], Cipher)> {
    let object = "keys/repository";
    let body = bytes
        .strip_prefix(REPO_KEY_MAGIC.as_slice())
        .ok_or_else(|| StoreError::corrupt(object, "not a snapblk repository key"))?;
    let (version, sealed) = body.split_first_chunk::<4>().ok_or_else(|| StoreError::corrupt(object, "truncated"))?;
    let version = u32::from_le_bytes(*version);
    let repo_cipher = Cipher::from_version(version).ok_or_else(|| {
        StoreError::corrupt(
            object,
            format!("repository format version {version} is newer than this snapblk; upgrade it"),
        )
    })?;
    let master = open(&cipher(kek), &repo_cipher.key_object_aad(), sealed).ok_or_else(|| {
        StoreError::WrongKey(format!(
            "the key file {} does not open region '{region}' (its repository was created with another key); configure the right key_file",
            key_file.display()
        ))
    })?;
    let master = master.try_into().map_err(|_| StoreError::corrupt(object, "wrong key length"))?;
    Ok((master, repo_cipher))
}

pub fn new_master() -> [u8; 32] {
    let mut k = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut k);
    k
}

/// The keys derived from a repository's master key, and its cipher.
pub struct RepoKeys {
    cipher: Cipher,
    /// XChaCha20-Poly1305's key (format 1), or the key that derives each message's AES key
    /// (format 2).
    data_key: [u8; 32],
    id_key: [u8; 32],
}

/// Where a blob's plaintext goes in the buffer given to [`RepoKeys::seal_blob_in_place`].
pub const BLOB_PLAIN_AT: usize = NONCE_LEN + 1;

/// The room [`RepoKeys::seal_blob_in_place`] needs for a plaintext of `plain_len` bytes (also
/// the largest sealed blob it can make).
pub const fn sealed_room(plain_len: usize) -> usize {
    BLOB_PLAIN_AT + plain_len + TAG_LEN
}

/// How a blob's plaintext is stored inside the seal.
const CODEC_RAW: u8 = 0;
const CODEC_LZ4: u8 = 1;

impl RepoKeys {
    pub fn new(master: &[u8; 32], cipher: Cipher) -> RepoKeys {
        let data_key = match cipher {
            Cipher::XChaCha20Poly1305 => blake3::derive_key("snapblk 2026 repository data key v1", master),
            Cipher::Aes256GcmSubkey => blake3::derive_key("snapblk 2026 repository subkey key v2", master),
        };
        RepoKeys { cipher, data_key, id_key: blake3::derive_key("snapblk 2026 blob id key v1", master) }
    }

    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    pub fn blob_id(&self, plain: &[u8]) -> BlobId {
        BlobId(*blake3::keyed_hash(&self.id_key, plain).as_bytes())
    }

    /// Compresses (lz4, kept only when smaller) and seals a blob, appending it to `out`.
    /// Returns the sealed length.
    pub fn seal_blob(&self, id: &BlobId, plain: &[u8], out: &mut Vec<u8>) -> usize {
        let start = out.len();
        out.resize(start + sealed_room(plain.len()), 0);
        out[start + BLOB_PLAIN_AT..start + BLOB_PLAIN_AT + plain.len()].copy_from_slice(plain);
        let mut scratch = Vec::new();
        let n = self.seal_blob_in_place(id, &mut out[start..], plain.len(), &mut scratch);
        out.truncate(start + n);
        n
    }

    /// Seals a blob where it lies: `buf[BLOB_PLAIN_AT..BLOB_PLAIN_AT + plain_len]` holds the
    /// plaintext and `buf` has room for [`sealed_room`]`(plain_len)` bytes. Compresses (lz4,
    /// kept only when smaller; `scratch` is its work space, reused across calls), encrypts
    /// with the repository's cipher, and leaves `nonce | codec | body | tag` at the start of
    /// `buf`. Returns the sealed length. Incompressible data (the usual case for a full disk)
    /// is never copied.
    pub fn seal_blob_in_place(&self, id: &BlobId, buf: &mut [u8], plain_len: usize, scratch: &mut Vec<u8>) -> usize {
        self.seal_blob_with_nonce(id, buf, plain_len, scratch, random_nonce())
    }

    fn seal_blob_with_nonce(
        &self,
        id: &BlobId,
        buf: &mut [u8],
        plain_len: usize,
        scratch: &mut Vec<u8>,
        nonce: [u8; NONCE_LEN],
    ) -> usize {
        assert!(buf.len() >= sealed_room(plain_len), "seal_blob_in_place: buffer too small");
        let plain = BLOB_PLAIN_AT..BLOB_PLAIN_AT + plain_len;
        // codec | plaintext length u32 | lz4 block: the layout of `compress_prepend_size`.
        let max = lz4_flex::block::get_maximum_output_size(plain_len);
        if scratch.len() < max {
            scratch.resize(max, 0);
        }
        let body_len = match lz4_flex::block::compress_into(&buf[plain.clone()], scratch) {
            Ok(n) if 4 + n < plain_len => {
                buf[NONCE_LEN] = CODEC_LZ4;
                buf[NONCE_LEN + 1..NONCE_LEN + 5].copy_from_slice(&(plain_len as u32).to_le_bytes());
                buf[NONCE_LEN + 5..NONCE_LEN + 5 + n].copy_from_slice(&scratch[..n]);
                5 + n
            }
            _ => {
                buf[NONCE_LEN] = CODEC_RAW;
                1 + plain_len
            }
        };
        self.seal_body(id, buf, body_len, nonce)
    }

    /// Seals a plaintext laid out as [`RepoKeys::seal_blob_in_place`] takes it, stored as is
    /// (no lz4 attempt: for data known not to shrink). Returns the sealed length.
    pub fn seal_raw_in_place(&self, id: &BlobId, buf: &mut [u8], plain_len: usize) -> usize {
        assert!(buf.len() >= sealed_room(plain_len), "seal_raw_in_place: buffer too small");
        buf[NONCE_LEN] = CODEC_RAW;
        self.seal_body(id, buf, 1 + plain_len, random_nonce())
    }

    /// Encrypts `buf[NONCE_LEN..NONCE_LEN + body_len]` (codec and body) under `nonce`, which
    /// goes first, and appends the tag.
    fn seal_body(&self, id: &BlobId, buf: &mut [u8], body_len: usize, nonce: [u8; NONCE_LEN]) -> usize {
        buf[..NONCE_LEN].copy_from_slice(&nonce);
        let (head, rest) = buf.split_at_mut(NONCE_LEN + body_len);
        let tag = self.seal_in_place(&nonce, &id.0, &mut head[NONCE_LEN..]);
        rest[..TAG_LEN].copy_from_slice(tag.as_ref());
        NONCE_LEN + body_len + TAG_LEN
    }

    /// The ring AEAD key and nonce that seal the message with this 24-byte `nonce`.
    ///
    /// Format 1 is XChaCha20-Poly1305 as the `chacha20poly1305` crate does it (an HChaCha20
    /// subkey from the first 16 nonce bytes, then ChaCha20-Poly1305 with `0u32 | nonce[16..]`)
    /// but computed with ring's ChaCha20-Poly1305, about twice as fast here. Format 2 is
    /// AES-256-GCM under `BLAKE3-keyed(data key, nonce)` with an all-zero GCM nonce.
    fn message_key(&self, nonce: &[u8]) -> (ring::aead::LessSafeKey, ring::aead::Nonce) {
        let (algorithm, subkey, inner): (_, [u8; 32], _) = match self.cipher {
            Cipher::XChaCha20Poly1305 => {
                let subkey = chacha20::hchacha::<chacha20::cipher::consts::U10>(
                    Key::from_slice(&self.data_key),
                    chacha20::cipher::generic_array::GenericArray::from_slice(&nonce[..16]),
                );
                let mut inner = [0u8; 12];
                inner[4..].copy_from_slice(&nonce[16..NONCE_LEN]);
                (&ring::aead::CHACHA20_POLY1305, subkey.into(), inner)
            }
            Cipher::Aes256GcmSubkey => {
                (&ring::aead::AES_256_GCM, *blake3::keyed_hash(&self.data_key, nonce).as_bytes(), [0u8; 12])
            }
        };
        // Cannot fail: both algorithms take 32-byte keys.
        let key = ring::aead::UnboundKey::new(algorithm, &subkey).unwrap_or_else(|_| unreachable!("a 32-byte key"));
        (ring::aead::LessSafeKey::new(key), ring::aead::Nonce::assume_unique_for_key(inner))
    }

    /// Encrypts `data` in place; returns the tag.
    fn seal_in_place(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], data: &mut [u8]) -> ring::aead::Tag {
        let (key, nonce) = self.message_key(nonce);
        // Cannot fail: blobs are far below the AEAD's 256 GiB message limit.
        key.seal_in_place_separate_tag(nonce, ring::aead::Aad::from(aad), data)
            .unwrap_or_else(|_| unreachable!("message within the AEAD limit"))
    }

    /// Decrypts `nonce | ciphertext | tag` in place; returns the plaintext part, or `None`
    /// when the tag does not match.
    fn open_in_place<'a>(&self, aad: &[u8], sealed: &'a mut [u8]) -> Option<&'a mut [u8]> {
        if sealed.len() < SEAL_OVERHEAD {
            return None;
        }
        let (nonce, rest) = sealed.split_at_mut(NONCE_LEN);
        let tag_at = rest.len() - TAG_LEN;
        let (ct, tag) = rest.split_at_mut(tag_at);
        let tag: [u8; TAG_LEN] = (&*tag).try_into().ok()?;
        let (key, nonce) = self.message_key(nonce);
        key.open_in_place_separate_tag(nonce, ring::aead::Aad::from(aad), ring::aead::Tag::from(tag), ct, 0..).ok()
    }

    /// Opens a sealed blob and checks that its plaintext hashes to `id`. `object` names where
    /// it came from, for the error.
    pub fn open_blob(&self, id: &BlobId, sealed: &[u8], object: &str) -> Result<Plaintext> {
        let mut buf = sealed.to_vec();
        let stored = match self.open_blob_in_place(id, &mut buf, object)? {
            Cow::Borrowed(p) => p.len(),
            Cow::Owned(decompressed) => return Ok(Plaintext { range: 0..decompressed.len(), buf: decompressed }),
        };
        // Stored as is: the plaintext follows the nonce and the codec byte.
        Ok(Plaintext { buf, range: NONCE_LEN + 1..NONCE_LEN + 1 + stored })
    }

    /// `open_blob` without copying: decrypts in `sealed` itself (a stored blob's plaintext is
    /// then a part of it; a compressed one is decompressed into a new buffer).
    pub fn open_blob_in_place<'a>(&self, id: &BlobId, sealed: &'a mut [u8], object: &str) -> Result<Cow<'a, [u8]>> {
        let body = self
            .open_in_place(&id.0, sealed)
            .ok_or_else(|| StoreError::corrupt(object, format!("blob {} fails its authentication tag", hex(&id.0))))?;
        let plain: Cow<'a, [u8]> =
            match body.split_first() {
                Some((&CODEC_RAW, p)) => Cow::Borrowed(p),
                Some((&CODEC_LZ4, p)) => Cow::Owned(lz4_flex::block::decompress_size_prepended(p).map_err(|e| {
                    StoreError::corrupt(object, format!("blob {} does not decompress: {e}", hex(&id.0)))
                })?),
                _ => return Err(StoreError::corrupt(object, format!("blob {} has an unknown codec", hex(&id.0)))),
            };
        if self.blob_id(&plain) != *id {
            return Err(StoreError::corrupt(object, format!("blob {} does not hash to its id", hex(&id.0))));
        }
        Ok(plain)
    }

    /// Seals small metadata (pack indexes, manifests) bound to `aad`: `nonce | ciphertext | tag`.
    pub fn seal_meta(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce = random_nonce();
        let mut out = Vec::with_capacity(plain.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self.seal_in_place(&nonce, aad, &mut out[NONCE_LEN..]);
        out.extend_from_slice(tag.as_ref());
        out
    }

    pub fn open_meta(&self, aad: &[u8], sealed: &[u8], object: &str) -> Result<Vec<u8>> {
        let mut buf = sealed.to_vec();
        let len = self
            .open_in_place(aad, &mut buf)
            .ok_or_else(|| StoreError::corrupt(object, "fails its authentication tag"))?
            .len();
        buf.copy_within(NONCE_LEN..NONCE_LEN + len, 0);
        buf.truncate(len);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_resealed_under_another_key_opens_there_only() {
        let mut random = vec![0u8; 65536];
        rand::thread_rng().fill_bytes(&mut random);
        let (from, to) = (RepoKeys::new(&[1; 32], Cipher::ALL[0]), RepoKeys::new(&[2; 32], Cipher::ALL[0]));
        for plain in [vec![0x5a; 65536], random] {
            let id = from.blob_id(&plain);
            let mut sealed = Vec::new();
            from.seal_blob(&id, &plain, &mut sealed);
            let opened = from.open_blob(&id, &sealed, "o").unwrap();
            let new_id = to.blob_id(&opened);
            assert_ne!(new_id, id, "ids are keyed per repository");
            let resealed = opened.seal_as(&to, &new_id);
            assert_eq!(resealed.len(), sealed.len(), "a blob keeps its size under another key");
            assert_eq!(&*to.open_blob(&new_id, &resealed, "o").unwrap(), &plain[..]);
            assert!(from.open_blob(&id, &resealed, "o").is_err());
        }
    }

    #[test]
    fn blob_roundtrip_compressible_and_random() {
        let mut random = vec![0u8; 65536];
        rand::thread_rng().fill_bytes(&mut random);
        for (c, plain) in Cipher::ALL.into_iter().flat_map(|c| [(c, vec![0xab; 65536]), (c, random.clone())]) {
            let keys = RepoKeys::new(&[7; 32], c);
            let id = keys.blob_id(&plain);
            let mut out = Vec::new();
            let n = keys.seal_blob(&id, &plain, &mut out);
            assert_eq!(n, out.len());
            assert!(n <= plain.len() + 1 + SEAL_OVERHEAD);
            assert_eq!(&*keys.open_blob(&id, &out, "p").unwrap(), &plain[..]);
            assert_eq!(&*keys.open_blob_in_place(&id, &mut out.clone(), "p").unwrap(), &plain[..]);
        }
    }

    #[test]
    fn format_1_sealing_and_opening_with_ring_match_the_chacha20poly1305_crate() {
        // The same bytes the chacha20poly1305 crate makes (format 1), for both codecs; and
        // what it makes opens (`open_blob` decrypts with ring too).
        let keys = RepoKeys::new(&[7; 32], Cipher::XChaCha20Poly1305);
        let data = cipher(&keys.data_key);
        let mut random = vec![0u8; 65536];
        rand::thread_rng().fill_bytes(&mut random);
        for plain in [vec![0xab; 65536], random, vec![1, 2, 3]] {
            let id = keys.blob_id(&plain);
            let nonce = random_nonce();
            let mut buf = vec![0u8; sealed_room(plain.len())];
            buf[BLOB_PLAIN_AT..BLOB_PLAIN_AT + plain.len()].copy_from_slice(&plain);
            let n = keys.seal_blob_with_nonce(&id, &mut buf, plain.len(), &mut Vec::new(), nonce);
            let mut body = buf[NONCE_LEN..n - TAG_LEN].to_vec();
            let expect = body.clone();
            data.decrypt_in_place_detached(XNonce::from_slice(&nonce), &id.0, &mut body, buf[n - TAG_LEN..n].into())
                .unwrap();
            let tag = data.encrypt_in_place_detached(XNonce::from_slice(&nonce), &id.0, &mut body).unwrap();
            assert_eq!(body, expect);
            assert_eq!(tag.as_slice(), &buf[n - TAG_LEN..n]);
            assert_eq!(&*keys.open_blob(&id, &buf[..n], "p").unwrap(), &plain[..]);
        }
        // Metadata (pack indexes, manifests), which format 1 sealed with that crate.
        let aad = b"snapblk manifest s-1";
        assert_eq!(open(&data, aad, &keys.seal_meta(aad, b"{}")).unwrap(), b"{}");
        let mut sealed = Vec::new();
        seal_into(&data, aad, b"[1]", &mut sealed);
        assert_eq!(keys.open_meta(aad, &sealed, "m").unwrap(), b"[1]");
    }

    #[test]
    fn format_2_seals_as_specified() {
        // Pinned bytes: AES-256-GCM under BLAKE3-keyed(subkey key, nonce), zero GCM nonce,
        // aad = blob id; `codec 0 | plaintext`, then the tag. Changing them breaks stores.
        let keys = RepoKeys::new(&[7; 32], Cipher::Aes256GcmSubkey);
        let plain = b"snapblk format 2";
        let id = keys.blob_id(plain);
        let mut buf = vec![0u8; sealed_room(plain.len())];
        buf[BLOB_PLAIN_AT..BLOB_PLAIN_AT + plain.len()].copy_from_slice(plain);
        let n = keys.seal_blob_with_nonce(&id, &mut buf, plain.len(), &mut Vec::new(), [5; NONCE_LEN]);
        assert_eq!(hex(&buf[NONCE_LEN..n]), "4399f684549dd6229211626544729f913aeda7f497a97ecc696ae8f0257ed70519");
        // The same, computed step by step.
        let subkey =
            blake3::keyed_hash(&blake3::derive_key("snapblk 2026 repository subkey key v2", &[7; 32]), &[5; 24]);
        let key = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, subkey.as_bytes()).unwrap(),
        );
        let mut body = [&[CODEC_RAW][..], plain].concat();
        let tag = key
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key([0; 12]),
                ring::aead::Aad::from(&id.0),
                &mut body,
            )
            .unwrap();
        assert_eq!(buf[NONCE_LEN..n], [&body[..], tag.as_ref()].concat());
        assert_eq!(&*keys.open_blob(&id, &buf[..n], "p").unwrap(), plain);
    }

    #[test]
    fn what_one_cipher_sealed_does_not_open_with_the_other() {
        let (v1, v2) =
            (RepoKeys::new(&[7; 32], Cipher::XChaCha20Poly1305), RepoKeys::new(&[7; 32], Cipher::Aes256GcmSubkey));
        assert_eq!(v1.blob_id(b"x"), v2.blob_id(b"x"), "blob ids do not depend on the cipher");
        for (a, b) in [(&v1, &v2), (&v2, &v1)] {
            let mut sealed = Vec::new();
            a.seal_blob(&a.blob_id(b"x"), b"x", &mut sealed);
            assert!(b.open_blob(&b.blob_id(b"x"), &sealed, "p").is_err());
            assert!(b.open_meta(b"m", &a.seal_meta(b"m", b"x"), "m").is_err());
        }
    }

    #[test]
    fn a_flipped_byte_or_a_swapped_id_is_detected() {
        for keys in Cipher::ALL.map(|c| RepoKeys::new(&[7; 32], c)) {
            flipped_bytes_and_swapped_ids_fail(&keys);
        }
    }

    fn flipped_bytes_and_swapped_ids_fail(keys: &RepoKeys) {
        let (a, b) = (vec![1u8; 4096], vec![2u8; 4096]);
        let (ia, ib) = (keys.blob_id(&a), keys.blob_id(&b));
        let mut sealed = Vec::new();
        keys.seal_blob(&ia, &a, &mut sealed);
        assert!(keys.open_blob(&ib, &sealed, "p").is_err(), "blob under another id");
        for i in [0, NONCE_LEN, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            let err = keys.open_blob(&ia, &bad, "packs/x").unwrap_err().to_string();
            assert!(err.contains("packs/x"), "{err}");
        }
        let meta = keys.seal_meta(b"aad", b"manifest");
        assert_eq!(keys.open_meta(b"aad", &meta, "m").unwrap(), b"manifest");
        assert!(keys.open_meta(b"other aad", &meta, "m").is_err());
        for i in [0, NONCE_LEN, meta.len() - 1] {
            let mut bad = meta.clone();
            bad[i] ^= 1;
            assert!(keys.open_meta(b"aad", &bad, "m").is_err());
        }
    }

    #[test]
    fn ids_depend_on_the_repository_key() {
        let (k1, k2) =
            (RepoKeys::new(&[1; 32], Cipher::Aes256GcmSubkey), RepoKeys::new(&[2; 32], Cipher::Aes256GcmSubkey));
        assert_ne!(k1.blob_id(b"same"), k2.blob_id(b"same"));
        assert_eq!(k1.blob_id(b"same"), k1.blob_id(b"same"));
    }

    #[test]
    fn wrong_kek_is_a_clear_error() {
        let master = new_master();
        for c in Cipher::ALL {
            let wrapped = wrap_master(&[1; 32], &master, c);
            assert_eq!(unwrap_master(&[1; 32], &wrapped, "r", Path::new("k")).unwrap(), (master, c));
            let err = unwrap_master(&[2; 32], &wrapped, "r", Path::new("k")).unwrap_err();
            assert!(matches!(err, StoreError::WrongKey(_)), "{err}");
        }
    }

    #[test]
    fn the_cipher_cannot_be_relabelled_and_newer_formats_are_refused() {
        let wrapped = wrap_master(&[1; 32], &new_master(), Cipher::Aes256GcmSubkey);
        let relabel = |v: u32| [&wrapped[..8], &v.to_le_bytes()[..], &wrapped[12..]].concat();
        // The version is bound into the tag: a downgrade to format 1 does not open.
        assert!(unwrap_master(&[1; 32], &relabel(1), "r", Path::new("k")).is_err());
        let err = unwrap_master(&[1; 32], &relabel(3), "r", Path::new("k")).unwrap_err().to_string();
        assert!(err.contains("version 3") && err.contains("upgrade"), "{err}");
    }

    #[test]
    fn key_files_are_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.key");
        assert!(check_key_file(&path, false, "r").is_ok(), "the default one is generated later");
        let err = check_key_file(&path, true, "r").unwrap_err().to_string();
        assert!(err.contains("does not exist") && err.contains("region 'r'"), "{err}");
        std::fs::write(&path, "snapblk-kek 1234\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = check_key_file(&path, true, "r").unwrap_err().to_string();
        assert!(err.contains("is not a snapblk key file"), "{err}");
        std::fs::write(&path, new_key_file_text()).unwrap();
        assert!(check_key_file(&path, true, "r").is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_key_file(&path, true, "r").unwrap_err().to_string().contains("chmod 600"));
    }

    #[test]
    fn a_key_file_any_user_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        load_or_create_kek(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create_kek(&path).unwrap_err().to_string();
        assert!(err.contains("can be read by any user") && err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        load_or_create_kek(&path).unwrap();
    }

    #[test]
    fn key_files_roundtrip_and_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/r.key");
        let (k1, created) = load_or_create_kek(&path).unwrap();
        assert!(created);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (k2, created) = load_or_create_kek(&path).unwrap();
        assert!(!created);
        assert_eq!(k1, k2);
        std::fs::write(&path, "garbage").unwrap();
        assert!(load_or_create_kek(&path).is_err());
    }
}
