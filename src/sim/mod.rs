//! The provider simulator (issue 3).
