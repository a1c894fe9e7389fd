//! Lease keys: one per guest. A key becomes a file name (and later an etcd
//! key), so only a small, safe alphabet is accepted.

use crate::error::{LeaseError, Result};

/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 64;
/// Longest owner accepted.
pub const MAX_OWNER_LEN: usize = 255;

/// A validated lease key: 1 to [`MAX_KEY_LEN`] of `[A-Za-z0-9._-]`, not starting with `.`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key(String);

impl Key {
    /// Validates `key`.
    pub fn new(key: &str) -> Result<Self> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        let ok = !key.is_empty() && key.len() <= MAX_KEY_LEN && !key.starts_with('.') && key.chars().all(allowed);
        if ok {
            Ok(Self(key.to_owned()))
        } else {
            Err(LeaseError::InvalidKey(key.to_owned()))
        }
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Refuses owners the store cannot hold: empty (the store's "released"),
/// longer than [`MAX_OWNER_LEN`] bytes, or with control characters.
pub fn check_owner(owner: &str) -> Result<()> {
    if owner.is_empty() || owner.len() > MAX_OWNER_LEN || owner.chars().any(char::is_control) {
        return Err(LeaseError::InvalidOwner(owner.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_in_the_alphabet_are_accepted() {
        for k in ["vm1", "a", "guest-7.prod_x", &"k".repeat(MAX_KEY_LEN)] {
            assert_eq!(Key::new(k).map(|k| k.as_str().to_owned()).ok(), Some(k.to_owned()));
        }
    }

    #[test]
    fn keys_outside_the_alphabet_are_refused() {
        let long = "k".repeat(MAX_KEY_LEN + 1);
        for k in ["", ".hidden", "..", "a/b", "../x", "a b", "vm\n1", "é", long.as_str()] {
            assert!(matches!(Key::new(k), Err(LeaseError::InvalidKey(_))), "{k:?} accepted");
        }
    }

    #[test]
    fn empty_and_control_owners_are_refused() {
        assert!(check_owner("host-a").is_ok());
        for o in ["", "a\nb", &"o".repeat(MAX_OWNER_LEN + 1)] {
            assert!(matches!(check_owner(o), Err(LeaseError::InvalidOwner(_))));
        }
    }
}
