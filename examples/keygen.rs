//! Creates or inspects a secp256k1 key file (64 hex characters, mode 0600),
//! the format `--key-file` and `auth.private_key_file` read.
//!
//! ```text
//! cargo run --example keygen -- publisher.key           # create; refuses to overwrite
//! cargo run --example keygen -- --force publisher.key   # replace (the old key is lost)
//! cargo run --example keygen -- --show publisher.key    # print the public forms
//! ```
//!
//! Prints the compressed public key (what `trusted_sequencers`, `--trust`,
//! `publisher_key` and `--publisher-key` take), the uncompressed key and the
//! Ethereum address (EIP-55). The private key is never printed.

use std::{
    fs::OpenOptions,
    io,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Parser;
use publisher_transport::{KeyError, PublicKey, SecretKey};

#[derive(Debug, Parser)]
#[command(about = "Creates or shows a secp256k1 key file")]
pub struct Args {
    /// The key file.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    /// Print the public key, uncompressed key and address of an existing file.
    #[arg(long, conflicts_with = "force")]
    pub show: bool,
    /// Replace an existing file (its key is lost).
    #[arg(long)]
    pub force: bool,
}

/// Why keygen failed. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    /// The file exists and `--force` was not given.
    #[error("{}: already exists; pass --force to replace it (the key it holds is lost)", .0.display())]
    Exists(PathBuf),
    /// Creating the file failed.
    #[error("{}: {source}", path.display())]
    Create {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Saving or loading the key failed.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Creates a key file holding a fresh key, owner-only; an existing file is
/// refused unless `force`.
pub fn create(path: &Path, force: bool) -> Result<SecretKey, KeygenError> {
    if !force {
        // Claim the name atomically: two keygens never both succeed.
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        if let Err(source) = options.open(path) {
            return Err(match source.kind() {
                io::ErrorKind::AlreadyExists => KeygenError::Exists(path.to_owned()),
                _ => KeygenError::Create {
                    path: path.to_owned(),
                    source,
                },
            });
        }
    }
    let key = SecretKey::generate();
    if let Err(err) = key.save(path) {
        if !force {
            let _ = std::fs::remove_file(path);
        }
        return Err(err.into());
    }
    Ok(key)
}

/// The public forms of a key, one `label value` per line.
pub fn describe(public: &PublicKey) -> String {
    format!(
        "public key {public}\nuncompressed {}\naddress {}\n",
        hex::encode(public.to_uncompressed()),
        public.address()
    )
}

/// Runs the command; returns what to print.
pub fn run(args: &Args) -> Result<String, KeygenError> {
    if args.show {
        let key = SecretKey::load(&args.path)?;
        return Ok(describe(key.public_key()));
    }
    let key = create(&args.path, args.force)?;
    Ok(format!(
        "created {} (mode 0600)\n{}",
        args.path.display(),
        describe(key.public_key())
    ))
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
