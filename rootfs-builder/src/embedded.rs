//! The recipes compiled into the crate, for programs that build an image without a checkout
//! (agentd builds its default image `opencode` on first use from [`opencode`]).

use std::fs;
use std::io;
use std::path::Path;

use crate::recipe::{Recipe, RecipeError};

/// A recipe and the files it refers to, relative to the recipe's dir.
pub struct EmbeddedRecipe {
    /// The recipe's file name (`opencode.toml`).
    pub name: &'static str,
    /// The recipe's text.
    pub text: &'static str,
    /// `(path relative to the recipe's dir, content)` of each file it refers to.
    pub files: &'static [(&'static str, &'static str)],
}

/// `recipes/opencode.toml`: Debian 12 with OpenCode for a user `agent`.
pub fn opencode() -> EmbeddedRecipe {
    EmbeddedRecipe {
        name: "opencode.toml",
        text: include_str!("../recipes/opencode.toml"),
        files: &[
            (
                "opencode/passwd",
                include_str!("../recipes/opencode/passwd"),
            ),
            ("opencode/group", include_str!("../recipes/opencode/group")),
            (
                "opencode/package-lock.json",
                include_str!("../recipes/opencode/package-lock.json"),
            ),
            ("opencode.lock", include_str!("../recipes/opencode.lock")),
        ],
    }
}

/// Errors writing out an embedded recipe.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// Its files could not be written.
    #[error("cannot write the embedded recipe to {dir}: {source}")]
    Write {
        /// Where.
        dir: String,
        /// Why.
        source: io::Error,
    },
    /// It does not parse (a bug in this crate: its tests load every embedded recipe).
    #[error(transparent)]
    Recipe(#[from] RecipeError),
}

impl EmbeddedRecipe {
    /// Writes the recipe and its files into `dir` (a recipe refers to files by path) and
    /// loads it from there.
    pub fn load_into(&self, dir: &Path) -> Result<Recipe, EmbeddedError> {
        let write = |rel: &str, text: &str| -> io::Result<()> {
            let path = dir.join(rel);
            fs::create_dir_all(path.parent().unwrap_or(dir))?;
            fs::write(&path, text)
        };
        for (rel, text) in self.files {
            write(rel, text).map_err(|source| EmbeddedError::Write {
                dir: dir.display().to_string(),
                source,
            })?;
        }
        write(self.name, self.text).map_err(|source| EmbeddedError::Write {
            dir: dir.display().to_string(),
            source,
        })?;
        Ok(Recipe::load(&dir.join(self.name))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_embedded_recipes_load() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = opencode().load_into(dir.path()).unwrap();
        assert!(!recipe.steps.is_empty());
    }
}
