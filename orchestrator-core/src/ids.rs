//! Typed identifiers. Every id is a UUID v7 (time-ordered), serialized as its hyphenated string.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh, time-ordered (UUID v7) id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
            /// The underlying UUID.
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }
    };
}

id_type!(
    /// Identifies a [`crate::domain::Project`].
    ProjectId
);
id_type!(
    /// Identifies a [`crate::domain::RequirementsDraft`].
    DraftId
);
id_type!(
    /// Identifies a [`crate::domain::WorkItem`] (and its [`crate::domain::ScheduledTask`]).
    WorkItemId
);
id_type!(
    /// Identifies a [`crate::domain::Run`].
    RunId
);
id_type!(
    /// Identifies an [`crate::domain::ApprovalRequest`].
    ApprovalId
);
id_type!(
    /// Identifies a [`crate::domain::ToolRecipe`].
    RecipeId
);
id_type!(
    /// Identifies an [`crate::domain::InfoRequest`].
    InfoRequestId
);
